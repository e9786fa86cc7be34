"""``proxyless-ray ui`` (the MLflow UI on the tracking store) and ``proxyless-ray results`` (Pareto tables from it)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from proxyless_ray.config import TrackingConfig
from proxyless_ray.tracking.store import check_existing_store, ui_link
from proxyless_ray.tracking.tracker import check_reachable, local_artifact_root, resolve_uri

UI_START_TIMEOUT_S = 180.0  # ~15 s on an idle machine; minutes on a loaded one


def _store(args: argparse.Namespace) -> str:
    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    check_existing_store(uri)  # reading never creates a store (MLflow would create the file and its tables)
    return uri


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


def cmd_ui(args: argparse.Namespace) -> int:
    uri = _store(args)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
        print(f"MLflow UI: {ui_link(uri, experiment_id(uri, args.experiment))} (the tracking server serves its own "
              f"UI)", flush=True)
        return 0
    host = args.host
    port = args.port or free_port(host)
    url = f"http://{host}:{port}"
    quiet = subprocess.DEVNULL if args.background else None
    # Its own process group, so stopping it reaches every process it started; no job runner (GenAI jobs are not
    # used here, and its consumers would outlive a plain kill of the UI).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(ui_command(uri, host, port), stdout=quiet, stderr=quiet, env=env, start_new_session=True)
    try:
        wait_healthy(url, proc)
    except (RuntimeError, KeyboardInterrupt):
        stop_group(proc)
        raise
    print(f"MLflow UI: {ui_link(url, experiment_id(url, args.experiment))}  (store {uri})", flush=True)
    if args.background:
        print(f"pid {proc.pid}; stop it with: kill -- -{proc.pid}", flush=True)
        return 0
    # the server lives in its own session: a SIGTERM to this command (a service manager, a script's kill) must
    # reach it too, or the server outlives the command that started it
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        return 0


def experiment_id(server: str, name: str) -> str | None:
    """The id of experiment ``name`` on a running tracking server (None when it has no such experiment yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient(server).get_experiment_by_name(name)
    except MlflowException:  # the link then opens the list of experiments; the UI itself is up
        return None
    return found.experiment_id if found is not None and found.lifecycle_stage == "active" else None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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


def cmd_results(args: argparse.Namespace) -> int:
    from proxyless_ray.tracking.results import format_table, results_table

    uri = _store(args)
    check_reachable(uri)
    table = results_table(uri, args.experiment, hardware=args.hardware, include_unfinished=args.all)
    print(format_table(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                          "sqlite:///mlflow.db in this folder)")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store",
                       description="Start the MLflow UI on the tracking store (bound to 127.0.0.1 unless --host says "
                                   "otherwise) and print its address; Ctrl-C stops it.")
    _store_args(p)
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--background", action="store_true", help="print the address and PID and return")
    p.add_argument("--experiment", default=TrackingConfig.experiment, help="MLflow experiment the printed link opens "
                                                                            "(default: %(default)s)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("results", help="print the Pareto table per hardware from MLflow",
                       description="Read every finished search and sweep trial of an MLflow experiment and print "
                                   "held-out accuracy vs expected latency per hardware, Pareto-front members marked.")
    _store_args(p)
    p.add_argument("--experiment", default=TrackingConfig.experiment, help="MLflow experiment name "
                                                                            "(default: %(default)s)")
    p.add_argument("--hardware", help="only this hardware profile")
    p.add_argument("--all", action="store_true", help="include running and failed runs")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.set_defaults(func=cmd_results)
