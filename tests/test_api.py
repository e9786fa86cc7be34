"""The public API as the README's notebook example uses it, on a tiny experiment (search in this process, the
predicted latency, a retraining), with real MLflow tracking into a temporary sqlite store."""

from __future__ import annotations

import os
import signal

import pytest

import proxyless_ray as pr
from proxyless_ray.latency.profile import list_profiles

from conftest import requires_fmnist, sqlite_store, tiny_experiment


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
    exp = tiny_experiment(tmp_path, tracking={"enabled": True, "uri": sqlite_store(tmp_path)})
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


@pytest.mark.ray
@pytest.mark.slow
@requires_fmnist
def test_run_sweep_returns_the_run_ids_the_sweep_logged(tmp_path):
    """A tiny sweep (2 hardware x 1 coefficient, 2 epochs of a few steps, both at once) through the API on real Ray
    Tune and a real sqlite store: the result's run ids are the store's runs, with the trial's params and metrics."""
    from mlflow import MlflowClient

    uri = sqlite_store(tmp_path)
    exp = tiny_experiment(
        tmp_path, name="sweep",
        train={"epochs": 2, "warmup_epochs": 0, "arch_update_every": 2, "max_steps_per_epoch": 4, "threads": 1,
               "channels_last": False, "arch_lr": 0.05},
        sweep={"hardware": ["pixel1", "v100_roofline"], "lambdas": [0.5], "scheduler": "fifo",
               "max_concurrent_trials": 2},
        tracking={"enabled": True, "uri": uri, "register_models": False})
    ray_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    handler = signal.getsignal(signal.SIGINT)
    front = pr.run_sweep(exp)
    assert isinstance(front, pr.SweepResult) and front.finished == 2
    # a notebook gets its process back: Ray's variables and Python's Ctrl-C handler as they were before the call
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY_")} == ray_env
    assert signal.getsignal(signal.SIGINT) is handler
    assert set(front.mlflow_run_ids) == set(front.table["trial_id"]) == {"pixel1-add-lam0.5",
                                                                          "v100_roofline-add-lam0.5"}
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(front.mlflow_parent_run_id)
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{front.mlflow_parent_run_id}'")
    assert {r.info.run_id for r in children} == set(front.mlflow_run_ids.values())
    for _, row in front.table.iterrows():
        run = client.get_run(front.mlflow_run_ids[row["trial_id"]])
        assert run.data.tags["trial_key"] == row["trial_id"] and run.data.tags["hardware"] == row["hardware"]
        assert run.data.params["latency.profile"] == row["hardware"]
        assert float(run.data.params["latency.lambda"]) == 0.5 and run.data.tags["lambda"] == "0.5"
        assert run.data.metrics["heldout_acc"] == pytest.approx(row["heldout_acc"])
        assert run.data.metrics["expected_latency_ms"] == pytest.approx(row["expected_latency_ms"])
