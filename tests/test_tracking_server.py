"""Tracking against a real ``mlflow server`` (sqlite backend, proxied artifacts) and the ``proxyless-ray ui`` command.

Each test starts its own server or UI on a free 127.0.0.1 port in a temp folder and stops it by its process id.
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
from proxyless_ray.commands.tracking import free_port, wait_healthy
from proxyless_ray.tracking_registry import load_registered
from proxyless_ray.trainer import run_local

from conftest import requires_fmnist, tiny_experiment

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def _stop(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's parent process (it stops its workers), SIGKILL to its group if it hangs."""
    try:
        os.kill(pid, signal.SIGTERM)
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
    os.killpg(pid, signal.SIGKILL)  # the server was started in its own session: this group is ours alone
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a broken server fails the test, not hangs it
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # one process fewer to start; jobs unused
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=240)  # ~15 s on an idle machine, minutes under load
        yield url
    finally:
        _stop(proc.pid)
        log.close()


@requires_fmnist
def test_search_against_a_tracking_server(tmp_path, mlflow_server):
    uri = mlflow_server
    exp = tiny_experiment(tmp_path, tracking={"enabled": True, "uri": uri})
    result = run_local(exp, echo=False)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name("proxyless-ray")
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
    assert (tmp_path / "artifacts").is_dir()  # ... and live in the server's artifacts destination
    # registry: version numbers are strings through REST
    versions = client.search_model_versions("name = 'proxyless-flops'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == child.info.run_id
    assert float(versions[0].tags["latency_ms"]) == pytest.approx(result["latency_ms"], rel=1e-5)
    net = load_registered(uri, "models:/proxyless-flops/1")
    with torch.no_grad():
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    # the results command reads the same server
    assert main(["results", "--tracking-uri", uri]) == 0


def test_ui_command_serves_the_sqlite_store_on_localhost(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("proxyless-ray", artifact_location=(tmp_path / "mlruns").as_uri())
    assert main(["ui", "--tracking-uri", uri, "--background"]) == 0
    out = capsys.readouterr().out
    url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", out).group(1)
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
