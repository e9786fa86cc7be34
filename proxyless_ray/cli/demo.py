"""``proxyless-ray demo``: the README's main job on the embedded defaults."""

from __future__ import annotations

import argparse

from proxyless_ray.config import load_experiment


def cmd_demo(args: argparse.Namespace) -> int:
    from proxyless_ray.demo import demo_experiment_path, run_demo

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    run_demo(load_experiment(args.experiment or demo_experiment_path(), overrides))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo: a Fashion-MNIST sweep over 3 hardware targets + retraining",
                       description="Sweep Fashion-MNIST over this CPU's profile, the Pixel-1 profile and the V100 "
                                   "profile x several latency coefficients on local Ray, track it in sqlite MLflow, "
                                   "fine-tune the Pareto-front networks and print the per-hardware table.")
    p.add_argument("--experiment", help="experiment YAML (default: experiments/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--out", help="output root (default: runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--no-tracking", action="store_true", help="run without MLflow")
    p.set_defaults(func=cmd_demo)
