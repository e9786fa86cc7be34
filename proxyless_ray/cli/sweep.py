"""``proxyless-ray sweep EXP``: hardware x latency-coefficient sweep on Ray Tune, ending with the Pareto report."""

from __future__ import annotations

import argparse

from proxyless_ray.cli.search import add_experiment_args, check_cluster, experiment_from_args


def cmd_sweep(args: argparse.Namespace) -> int:
    exp = experiment_from_args(args)
    from proxyless_ray.sweeps.plan import sweep_grid

    sweep_grid(exp)  # an empty or invalid grid fails before Ray is imported or started
    check_cluster(exp)
    from proxyless_ray import api

    files = api.run_sweep(exp, resume=args.resume).files
    print(f"\nSweep report: {files['table_csv']} and {files['plot']}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a latency trade-off sweep (hardware x coefficients) on Ray Tune",
                       description="Run one Ray Tune experiment over the experiment's sweep section; print and save "
                                   "the accuracy-latency Pareto front per hardware.")
    add_experiment_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--scheduler", dest="scheduler", help="fifo, asha or pareto (sets sweep.scheduler)")
    p.set_defaults(func=cmd_sweep)
