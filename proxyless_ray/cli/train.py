"""``proxyless-ray train --arch A EXP``: retrain a derived network, measure it here, export it."""

from __future__ import annotations

import argparse
import json

from proxyless_ray.cli.search import add_experiment_args, experiment_from_args


def cmd_train(args: argparse.Namespace) -> int:
    exp = experiment_from_args(args)
    from proxyless_ray import api

    result = api.retrain(exp, args.arch, finetune=args.finetune, epochs=args.epochs, lr=args.lr).raw
    print(json.dumps({k: result[k] for k in ("arch", "test_acc", "predicted_latency_ms", "measured_cpu_latency_ms",
                                             "latency_ratio", "latency_note", "profile", "out_dir")}, indent=2))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="retrain a derived network and measure it on this device",
                       description="Train a derived architecture from scratch (or fine-tune its inherited weights) "
                                   "through the same drivers as the search; report test top-1, the latency "
                                   "measured here next to the profile's prediction, and export it.")
    p.add_argument("--arch", required=True,
                   help="arch.json, an exported network folder, runs:/<run_id> or models:/<name>/<version>")
    p.add_argument("--finetune", action="store_true", help="start from the inherited weights instead of scratch")
    p.add_argument("--epochs", type=int, help="training epochs (default: train.epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: train.lr)")
    add_experiment_args(p)
    p.set_defaults(func=cmd_train)
