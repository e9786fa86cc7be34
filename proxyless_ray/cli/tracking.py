"""``proxyless-ray ui`` (the MLflow UI on the tracking store) and ``proxyless-ray results`` (Pareto tables from it)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from proxyless_ray.config import TrackingConfig
from proxyless_ray.tracking.server import (
    experiment_id,
    free_port,
    stop_group,
    ui_command,
    wait_healthy,
)
from proxyless_ray.tracking.store import check_existing_store, ui_link
from proxyless_ray.tracking.tracker import check_reachable, resolve_uri


def _store(args: argparse.Namespace) -> str:
    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    check_existing_store(uri)  # reading never creates a store (MLflow would create the file and its tables)
    return uri


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


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
