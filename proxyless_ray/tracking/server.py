"""The MLflow UI as a local server: a free port, the ``mlflow ui`` command on a store, the health poll, and
stopping its process group (the library behind ``proxyless-ray ui``; tests and benchmarks start it the same way)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from proxyless_ray.tracking.tracker import local_artifact_root

UI_START_TIMEOUT_S = 180.0  # seconds on an idle machine; minutes on a loaded one


UI_WORKERS = 2  # one person browsing; fewer server processes start sooner on a 2-core laptop (MLflow: 4)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = UI_START_TIMEOUT_S) -> None:
    """Poll ``<url>/health`` until it answers OK.

    Raises:
        RuntimeError: the process exited first, or the timeout passed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MLflow UI exited with status {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the MLflow UI did not answer at {url}/health within {timeout_s:.0f} s")


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` on this store; a sqlite store serves its artifacts from the folder the tracker writes to."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(UI_WORKERS)]
    root = local_artifact_root(uri)
    if root is not None:
        cmd += ["--artifacts-destination", root]
    return cmd


def experiment_id(server: str, name: str) -> str | None:
    """The id of experiment ``name`` on a running tracking server (None when it has no such experiment yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient(server).get_experiment_by_name(name)
    except MlflowException:  # the link then opens the list of experiments; the UI itself is up
        return None
    return found.experiment_id if found is not None and found.lifecycle_stage == "active" else None


def stop_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the UI's process group (it was started in its own session), SIGKILL if it does not stop."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
