"""Shared fixtures: a tiny experiment on real Fashion-MNIST images, and Ray environment hygiene."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from proxyless_ray.config import Experiment
from proxyless_ray.data.fashion_mnist import DEFAULT_DIR

# A shell starts background jobs with SIGINT ignored and Python keeps it so, as do the processes it starts: the
# Ctrl-C tests need Python's own handler here and the default in the commands they run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default, so each report of the suite's millisecond epochs
# waited up to 2 s; Ray reads the variable in the controller, which inherits it from the cluster this starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# One empty MLflow store migrated per session and copied for each test that wants a new one: creating the tables
# of a new sqlite store takes seconds, and a test or a server given a copy uses the same real store.
_MLFLOW_TEMPLATE: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _mlflow_template(tmp_path_factory):
    _MLFLOW_TEMPLATE.append(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")  # filled on first use
    yield
    _MLFLOW_TEMPLATE.clear()


def sqlite_store(folder: str | os.PathLike, name: str = "mlflow.db") -> str:
    """The URI of a new, empty MLflow sqlite store ``folder/name`` (a copy of the session's migrated one)."""
    template = _MLFLOW_TEMPLATE[0]
    if not template.exists():
        from mlflow import MlflowClient  # only the tests that track pay for importing MLflow

        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
    db = Path(folder) / name
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def _ray_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("RAY_", "TUNE_")) or k in RAY_SET_ENV}


# Variables Ray or our embedded-cluster settings put into os.environ without the RAY_ prefix.
RAY_SET_ENV = ("REPORTER_UPDATE_INTERVAL_MS", "PYTHONBREAKPOINT")
_BASELINE_RAY_ENV = _ray_env()


@pytest.fixture(autouse=True)
def _fresh_ray_state():
    """Each test that leaves this process without a Ray session leaves it as a new process would find it.

    Ray reads its auth mode and token once per process and caches them (RayConfig and the token loader), and a
    session puts variables into os.environ (its auth mode, the lean cluster's settings) that outlive it. A later
    ray.init or cluster here then inherited them: a new local cluster failed to start its GCS with
    InvalidAuthToken, and a cluster_utils actor never started. Ray's own tests reset its auth state the same way.
    """
    yield
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a sweep's Tune driver left its Ctrl-C handler
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        return  # a module's shared session (test_ray_trainer's) keeps its settings until the module stops it
    for key in _ray_env().keys() - _BASELINE_RAY_ENV.keys():
        os.environ.pop(key, None)
    os.environ.update(_BASELINE_RAY_ENV)
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


TINY_SPACE = {"preset": "small", "widths": [8, 16], "depths": [1, 2], "strides": [1, 2], "kernel_sizes": [3, 5],
              "exp_ratios": [3], "feature_mix_chs": 32, "stem": "conv_k3_c8_s2", "first_block": "mb_k3_e1_c8_s1"}

# The published ProxylessNAS configs and latency tables (../shared/reference/README.md), read where they are and never
# copied into the project: beside the checkout (<repository>/../shared/reference), or where $PROXYLESS_REFERENCE_DIR
# points. Tests take their files through the `reference` fixture.
REFERENCE_ENV = "PROXYLESS_REFERENCE_DIR"
REQUIRE_REFERENCE_ENV = "PROXYLESS_REQUIRE_REFERENCE"
REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ[REFERENCE_ENV]) if os.environ.get(REFERENCE_ENV) else REPO.parent / "shared" / "reference"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def reference_required() -> bool:
    """Whether a missing reference file fails its test: in CI (.ci/run sets $PROXYLESS_REQUIRE_REFERENCE=1; CI
    services set $CI), so a run without the data cannot pass as if it had checked against it. Elsewhere the test
    skips with the same message: the project works without the data (shared/reference/README.md)."""
    flag = os.environ.get(REQUIRE_REFERENCE_ENV)
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "false", "no")
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_reference(path: Path, required: bool) -> str:
    """What a test that needs ``path`` says when it is absent: where it looked and how to point at the data."""
    where = f"${REFERENCE_ENV}={os.environ[REFERENCE_ENV]}" if os.environ.get(REFERENCE_ENV) \
        else f"the repository's sibling shared/reference, {REPO.parent / 'shared' / 'reference'}"
    then = (f"({REQUIRE_REFERENCE_ENV}=0 skips the tests that need it instead)" if required else
            f"(skipped; {REQUIRE_REFERENCE_ENV}=1, as in CI, fails instead)")
    return (f"reference data missing: {path} does not exist (looked in {where}); put the published ProxylessNAS/OFA "
            f"files there or point {REFERENCE_ENV} at their folder {then}")


@pytest.fixture
def reference():
    """``reference("proxylessnas", "mobile_trim.yaml")``: the path of a reference file; when it is missing the test
    fails where :func:`reference_required` (CI), else skips, saying where it looked and how to point at the data."""

    def find(*parts: str) -> Path:
        path = REFERENCE.joinpath(*parts)
        if not path.is_file():
            if reference_required():
                pytest.fail(missing_reference(path, True), pytrace=False)
            pytest.skip(missing_reference(path, False))
        return path

    return find


requires_fmnist = pytest.mark.skipif(not os.path.isdir(DEFAULT_DIR),
                                     reason=f"Fashion-MNIST not installed at {DEFAULT_DIR} (apt-get install "
                                            f"dataset-fashion-mnist)")


def tiny_experiment(tmp_path, **sections) -> Experiment:
    """A search that takes seconds: tiny space, a few hundred real images, a few steps per epoch."""
    d = {
        "name": "tiny",
        "out_dir": str(tmp_path / "runs"),
        "space": dict(TINY_SPACE),
        "data": {"train_subset": 256, "heldout_size": 128, "test_subset": 256, "batch_size": 32,
                 "eval_batch_size": 128},
        "train": {"epochs": 2, "warmup_epochs": 1, "arch_update_every": 2, "max_steps_per_epoch": 4, "threads": 1,
                  "ready_samples": 1, "channels_last": False},
        "latency": {"profile": "flops"},
        "dist": {"workers": 0, "storage_path": str(tmp_path / "ray_storage")},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return Experiment.from_dict(d)
