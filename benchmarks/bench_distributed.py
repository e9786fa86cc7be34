"""Benchmark: data-parallel scaling of the supernet search on Ray Train, and the data path. Prints one JSON object.

1. Scaling on this machine: supernet weight-step throughput (images/s) of 2 Ray Train workers x 1 thread against
   1 worker x 1 thread, the same global batch (128 = 1 x 128 = 2 x 64), the small space on Fashion-MNIST, warm-up
   phase (weight steps only). Efficiency = thr2 / (2 x thr1), target >= 0.8. Also the all-reduce share of the
   weight-step time on the 2-worker run. Each configuration runs 2 epochs of ``--steps`` steps; the second epoch
   is measured (the first pays for start-up and allocator warm-up). The 2-worker run uses the default even batch
   split; a third run with the straggler-aware split (``dist.balance_batches: true``, :mod:`proxyless_ray.balance`)
   is reported beside it.
2. Data path: JPEG decode + augment throughput of the Parquet reader against torchvision ImageFolder + PIL on the
   same images, 1 core (``benchmarks/bench_data.py``, run in a subprocess; target >= 1.5x).

Usage: ``python benchmarks/bench_distributed.py [--steps 60] [--skip-data]``. The two scaling runs are
interleaved ``--rounds`` times and the medians reported, so a busy machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import ray

from proxyless_ray.config import Experiment
from proxyless_ray.ray_trainer import ReportLog, build_trainer, connect, read_report_log


def experiment(workers: int, batch: int, steps: int, out: str, balance: bool = False) -> Experiment:
    return Experiment.from_dict({
        "name": f"scaling-{workers}w", "out_dir": out,
        "data": {"batch_size": batch, "heldout_size": 512, "train_subset": 0},
        "train": {"epochs": 2, "warmup_epochs": 2, "max_steps_per_epoch": steps, "threads": 1},
        "latency": {"profile": "flops"},
        "dist": {"workers": workers, "cpus_per_worker": 1, "checkpoint_every": 0, "storage_path": out,
                 "balance_batches": balance},
        "tracking": {"enabled": False},
    })


def run_once(workers: int, batch: int, steps: int, out: str, balance: bool = False) -> dict:
    log = os.path.join(out, f"reports-{workers}w-{len(os.listdir(out))}.jsonl")
    exp = experiment(workers, batch, steps, out, balance)
    result = build_trainer(exp, f"scaling-{workers}w-{len(os.listdir(out))}", {"until_epoch": 2},
                           callbacks=[ReportLog(log)]).fit()
    if result.error is not None:
        raise result.error
    last = read_report_log(log)[-1]["metrics"]
    r0 = last[0]
    return {"images_per_s": r0["weight_images_per_s"], "batch_split": r0["batch_split"],
            "allreduce_share_of_weight_steps": max(m.get("allreduce_share", 0.0) * m["epoch_s"] / m["weight_step_s"]
                                                   for m in last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-data", action="store_true")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench-dist-")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    connect(experiment(1, 128, args.steps, out), num_cpus=2)  # the embedded cluster `proxyless-ray search` starts
    one, two, balanced = [], [], []
    try:
        for _ in range(args.rounds):
            one.append(run_once(1, 128, args.steps, out))
            two.append(run_once(2, 64, args.steps, out))
            balanced.append(run_once(2, 64, args.steps, out, balance=True))
    finally:
        ray.shutdown()
    thr1 = statistics.median(r["images_per_s"] for r in one)
    thr2 = statistics.median(r["images_per_s"] for r in two)
    thr2_bal = statistics.median(r["images_per_s"] for r in balanced)
    report = {
        "benchmark": "distributed",
        "scaling": {"global_batch": 128, "steps_per_epoch": args.steps, "rounds": args.rounds,
                    "threads_per_worker": 1, "thr1_images_per_s": thr1, "thr2_images_per_s": thr2,
                    "efficiency": thr2 / (2 * thr1), "target_efficiency": 0.8,
                    # each round's own ratio too: the VM's speed drifts between rounds
                    "efficiency_per_round": [b["images_per_s"] / (2 * a["images_per_s"]) for a, b in zip(one, two)],
                    "allreduce_share_2w": statistics.median(r["allreduce_share_of_weight_steps"] for r in two),
                    "balanced_split": {
                        "thr2_images_per_s": thr2_bal, "efficiency": thr2_bal / (2 * thr1),
                        "efficiency_per_round": [b["images_per_s"] / (2 * a["images_per_s"])
                                                 for a, b in zip(one, balanced)],
                        "allreduce_share_2w": statistics.median(r["allreduce_share_of_weight_steps"]
                                                                for r in balanced)},
                    "runs_1w": one, "runs_2w": two, "runs_2w_balanced": balanced},
        "load_average": os.getloadavg(),
    }
    if not args.skip_data:
        here = os.path.dirname(os.path.abspath(__file__))
        data = subprocess.run([sys.executable, os.path.join(here, "bench_data.py")], capture_output=True, text=True,
                              check=True)
        report["data_path"] = json.loads(data.stdout.strip().splitlines()[-1])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
