"""``proxyless-ray search EXP``: one supernet search, in-process or on Ray Train workers."""

from __future__ import annotations

import argparse
import json

from proxyless_ray.choices import choices_help
from proxyless_ray.config import Experiment, load_experiment


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """Arguments every experiment-driven command shares."""
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/fashion_mnist.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set train.epochs=3 (repeatable); choices: {choices_help()}")
    p.add_argument("--data", help="data folder (sets data.path)")
    p.add_argument("--out", help="output root (sets out_dir); outputs go to <out>/<name>")
    p.add_argument("--workers", type=int, help="Ray Train workers (0: run in this process without Ray)")
    p.add_argument("--address", help="Ray cluster address ('auto', 'host:6379', 'ray://host:10001'); default: "
                                     "$RAY_ADDRESS (set inside 'ray job submit'), else embedded Ray")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker")
    p.add_argument("--storage-path", help="checkpoint storage (local folder or s3://, gs:// URI)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="run without MLflow tracking")


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    """Load the experiment and fold the command-line flags into its overrides."""
    overrides = list(args.overrides)
    for flag, key in (("data", "data.path"), ("out", "out_dir"), ("workers", "dist.workers"),
                      ("address", "dist.address"), ("gpus_per_worker", "dist.gpus_per_worker"),
                      ("storage_path", "dist.storage_path"), ("tracking_uri", "tracking.uri"),
                      ("scheduler", "sweep.scheduler")):
        value = getattr(args, flag, None)
        if value is not None:
            # paths and URIs stay strings (YAML would read --out 123 as a number); JSON strings are YAML strings
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "no_tracking", False):
        overrides.append("tracking.enabled=false")
    exp = load_experiment(args.experiment, overrides)
    if exp.dist.workers == 0:
        settle_local_threads(exp, reexec=getattr(args, "own_process", False))
    return exp


def settle_local_threads(exp: Experiment, reexec: bool) -> None:
    """Log, and put in place, the OpenMP wait policy of a search or retraining in this process.

    Args:
        exp: The experiment (``dist.workers == 0``).
        reexec: This process is the command line's own: it may re-execute itself when torch already read another
            policy (see :func:`proxyless_ray.runtime.ensure_thread_env`).
    """
    import sys

    from proxyless_ray.runtime import describe, ensure_thread_env, local_policy

    policy, threads, why = local_policy(exp)
    line = describe(policy, threads, why, "this process")
    if not ensure_thread_env(policy, reexec=reexec):
        line += "; NOT in force: torch was loaded with another (set it in the environment before Python starts)"
    print(line, file=sys.stderr, flush=True)


def check_cluster(exp: Experiment) -> None:
    """A cluster address that cannot work fails in a second, before torch, the data and MLflow load."""
    from proxyless_ray.distributed.cluster import check, effective_address

    address = effective_address(exp.dist.address)
    if address is not None:
        check(address, exp.dist.connect_timeout_s)


def cmd_search(args: argparse.Namespace) -> int:
    exp = experiment_from_args(args)
    if exp.dist.workers > 0:
        check_cluster(exp)
    from proxyless_ray import api

    api.run_search(exp, resume=args.resume)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run a ProxylessNAS supernet search",
                       description="Run a ProxylessNAS search and write the derived architecture, its latency on "
                                   "the target profile and the exported network to <out_dir>/<name>.")
    add_experiment_args(p)
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=cmd_search)
