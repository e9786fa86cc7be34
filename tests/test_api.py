"""The public API as the README's notebook example uses it, on a tiny experiment (search in this process, the
predicted latency, a retraining), with real MLflow tracking into a temporary sqlite store."""

from __future__ import annotations

import os

import pytest

import proxyless_ray as pr
from proxyless_ray.latency.profile import list_profiles

from conftest import requires_fmnist, tiny_experiment


def test_the_api_is_importable_without_loading_torch():
    import subprocess
    import sys

    code = "import sys, proxyless_ray; proxyless_ray.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pr.nope  # noqa: B018


@requires_fmnist
def test_the_readme_example_on_a_tiny_experiment(tmp_path):
    exp = tiny_experiment(tmp_path, tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    found = pr.run_search(exp)
    assert isinstance(found, pr.SearchResult)
    assert found.out_dir == exp.output_dir and os.path.isfile(found.arch_file)
    assert found.profile == "flops" and found.latency_ms > 0
    assert set(found.latency_on_profiles) == set(list_profiles())
    assert 0.0 <= found.test_acc <= 1.0 and found.mlflow_run_id
    assert pr.predict_latency(found.arch_file, "flops") == pytest.approx(found.latency_ms)
    net = pr.retrain(exp, found.arch_file, epochs=1)
    assert isinstance(net, pr.RetrainResult)
    assert 0.0 <= net.test_acc <= 1.0 and net.measured_cpu_latency_ms > 0 and net.mlflow_run_id
    assert os.path.isdir(net.out_dir)
