"""Tracking against a real ``mlflow server`` (sqlite backend, proxied artifacts) and the ``proxyless-ray ui`` command.

The server (one per module) and the UI run on free 127.0.0.1 ports in temp folders, each in its own session, and
are stopped through their process id (its process group).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient

from proxyless_ray.cli import main
from proxyless_ray.distributed.trainer import run_local
from proxyless_ray.tracking.registry import load_registered
from proxyless_ray.tracking.server import free_port, wait_healthy

from conftest import requires_fmnist, sqlite_store, tiny_experiment

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def _stop(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group we started the server or UI in, SIGKILL to it if the parent hangs."""
    try:
        os.killpg(pid, signal.SIGTERM)  # the group is ours alone: the process was started in its own session
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # already reaped (subprocess cleans up dropped Popen objects)
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (a cold start takes 15 s on an idle machine, minutes on a loaded one)."""
    tmp = tmp_path_factory.mktemp("server")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # a broken server fails the test, not hangs it
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # one process fewer to start; jobs unused here
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_store(tmp, "server.db"),
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=240)
        yield url, tmp
    finally:
        _stop(proc.pid)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@requires_fmnist
def test_search_against_a_tracking_server(tmp_path, mlflow_server):
    uri, server_dir = mlflow_server
    exp = tiny_experiment(tmp_path, tracking={"enabled": True, "uri": uri, "experiment": "one-search"})
    result = run_local(exp, echo=False)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name("one-search")
    assert found.artifact_location.startswith("mlflow-artifacts:")  # the server proxies artifacts
    runs = list(client.search_runs([found.experiment_id]))
    assert len(runs) == 2
    parent = next(r for r in runs if r.data.tags["role"] == "parent")
    child = next(r for r in runs if r.data.tags["role"] == "child")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == parent.info.status == "FINISHED"
    assert child.data.tags["derived_arch"] == result["arch"] and child.data.tags["hardware"] == "flops"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "heldout_acc")] == [1, 2]
    # artifacts come back through the server
    png = client.download_artifacts(child.info.run_id, "plots/arch.png", str(tmp_path))
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert "pareto" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (server_dir / "artifacts").is_dir()  # ... and live in the server's artifacts destination
    # registry: version numbers are strings through REST
    versions = client.search_model_versions("name = 'proxyless-flops'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == child.info.run_id
    assert float(versions[0].tags["latency_ms"]) == pytest.approx(result["latency_ms"], rel=1e-5)
    net = load_registered(uri, "models:/proxyless-flops/1")
    with torch.no_grad():
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    # the results command reads the same server
    assert main(["results", "--tracking-uri", uri, "--experiment", "one-search"]) == 0


@requires_fmnist
@pytest.mark.ray
def test_sweep_against_a_tracking_server(tmp_path, mlflow_server):
    from proxyless_ray.sweeps.sweep import run_sweep
    from proxyless_ray.tracking.tracker import Tracker

    uri, _ = mlflow_server
    # no warm-up: one Train run fewer (the shared warm-up is tested in test_sweep.py)
    exp = tiny_experiment(tmp_path, tracking={"enabled": True, "uri": uri, "experiment": "sweep"},
                          sweep={"hardware": ["pixel1"], "lambdas": [0.0, 0.5], "scheduler": "fifo",
                                 "workers_per_trial": 1, "max_concurrent_trials": 2}, dist={"workers": 1},
                          train={"warmup_epochs": 0})
    tracker = Tracker(exp)
    tracker.check()
    summary = run_sweep(exp, tracker=tracker)
    assert summary["finished"] == 2
    client = MlflowClient(uri)
    runs = list(client.search_runs([client.get_experiment_by_name("sweep").experiment_id]))
    parents = [r for r in runs if r.data.tags["role"] == "parent"]
    children = {r.data.tags["trial_key"]: r for r in runs if r.data.tags["role"] == "child"}
    assert len(parents) == 1 and parents[0].data.tags["kind"] == "sweep" and parents[0].info.status == "FINISHED"
    assert sorted(children) == ["pixel1-add-lam0", "pixel1-add-lam0.5"]
    for key, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["hardware"] == "pixel1" and run.data.tags["kind"] == "trial"
        assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "finished"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "expected_latency_ms")] == [1, 2], key
        assert "latency_cpu_1thread_ms" in run.data.metrics
        assert "plots/alpha_heatmap.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"pareto/pareto.parquet", "pareto/pareto.csv", "pareto/pareto.png", "pareto/summary.json"} <= {
        a.path for a in client.list_artifacts(parents[0].info.run_id, "pareto")}
    versions = client.search_model_versions("name = 'proxyless-pixel1'")
    front = {k for k, r in children.items() if any(v.run_id == r.info.run_id for v in versions)}
    assert front and all(float(v.tags["latency_ms"]) > 0 for v in versions)


def test_ui_command_serves_the_sqlite_store_on_localhost(tmp_path, capsys):
    uri = sqlite_store(tmp_path)
    eid = MlflowClient(uri).create_experiment("proxyless-ray", artifact_location=(tmp_path / "mlruns").as_uri())
    assert main(["ui", "--tracking-uri", uri, "--background"]) == 0
    out = capsys.readouterr().out
    url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", out).group(1)
    # the link opens the experiment's runs in the "Model training" view (MLflow's UI opens GenAI otherwise)
    assert f"MLflow UI: {url}/#/experiments/{eid}/runs?workflowType=machine_learning " in out
    pid = int(re.search(r"pid (\d+)", out).group(1))
    try:
        wait_healthy(url, timeout_s=10)
        client = MlflowClient(url)
        assert client.get_experiment_by_name("proxyless-ray") is not None
    finally:
        _stop(pid)


def test_ui_command_without_a_database_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui"]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_terminating_the_ui_command_stops_the_server_it_started(tmp_path):
    uri = sqlite_store(tmp_path)
    MlflowClient(uri).create_experiment("proxyless-ray", artifact_location=(tmp_path / "mlruns").as_uri())
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxyless_ray.cli", "ui", "--tracking-uri", uri],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "MLflow UI: http" not in (tmp_path / "ui.log").read_text():
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            time.sleep(0.5)
        url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", (tmp_path / "ui.log").read_text()).group(1)
        wait_healthy(url, timeout_s=10)
        proc.send_signal(signal.SIGTERM)  # what a service manager or a script's plain kill sends
        assert proc.wait(timeout=60) == 0
        with pytest.raises(RuntimeError):  # nothing answers any more: the server went with the command
            wait_healthy(url, timeout_s=3)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
