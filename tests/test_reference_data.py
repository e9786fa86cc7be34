"""The published reference data is found beside the checkout (or where $PROXYLESS_REFERENCE_DIR points), and a test
that needs it fails in CI with a message saying where it looked, instead of skipping unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE, REFERENCE_ENV, REPO, REQUIRE_REFERENCE_ENV

NEEDS_IT = "tests/nn/test_arch.py::test_published_configs_convert"


def test_the_reference_folder_is_found_relative_to_the_repository():
    if os.environ.get(REFERENCE_ENV):
        assert REFERENCE == Path(os.environ[REFERENCE_ENV])
    else:
        assert REFERENCE == REPO.parent / "shared" / "reference"
    assert (REPO / "tests" / "conftest.py").is_file()


def run_needing_reference(tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", REQUIRE_REFERENCE_ENV)}
    clean.update({REFERENCE_ENV: str(tmp_path / "nowhere"), **env})
    return subprocess.run([sys.executable, "-m", "pytest", NEEDS_IT, "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env", [{REQUIRE_REFERENCE_ENV: "1"}, {"CI": "true"}])
def test_missing_reference_fails_in_ci_saying_where_it_looked(tmp_path, env):
    run = run_needing_reference(tmp_path, **env)
    assert run.returncode == 1, run.stdout[-2000:]
    missing = tmp_path / "nowhere" / "proxylessnas" / "proxyless_mobile.config"
    assert f"reference data missing: {missing} does not exist" in run.stdout, run.stdout[-2000:]
    assert f"looked in ${REFERENCE_ENV}={tmp_path / 'nowhere'}" in run.stdout
    assert "1 failed" in run.stdout


def test_missing_reference_skips_with_the_same_message_outside_ci(tmp_path):
    run = run_needing_reference(tmp_path, **{REQUIRE_REFERENCE_ENV: "0"})
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout[-2000:]
    assert "reference data missing" in run.stdout
    assert f"{REQUIRE_REFERENCE_ENV}=1, as in CI, fails instead" in run.stdout
