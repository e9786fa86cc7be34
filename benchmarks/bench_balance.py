"""Benchmark: the straggler-aware batch split against the even split when one of 2 workers is slower. Prints JSON.

Two gloo processes run the product's search loop (small space, Fashion-MNIST, global batch 128, 1 thread each,
warm-up phase, ``--steps`` steps per epoch, the second epoch measured). Rank 1 is made a straggler by a delay per
image it reads (``--delay-ms``; 1 ms per image makes it about 1.5x slower on the development VM), standing in for a
slower node or a shared core. Three configurations, interleaved ``--rounds`` times: no straggler (even split), a
straggler with the even split (the default), a straggler with the balanced split (:mod:`proxyless_ray.search.balance`).
Throughput is rank 0's epoch images/s (waiting for the straggler included).

Usage: ``python benchmarks/bench_balance.py [--steps 40] [--rounds 2] [--delay-ms 1.0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from proxyless_ray.config import Experiment
from proxyless_ray.data import build_splits
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.tracking.server import free_port


class SlowSource:
    """A training split that takes ``delay_s`` per image read."""

    def __init__(self, source, delay_s: float):
        self.source, self.delay_s = source, delay_s

    def __len__(self) -> int:
        return len(self.source)

    def get_batch(self, indices, train, generator=None):
        time.sleep(self.delay_s * len(indices))
        return self.source.get_batch(indices, train, generator)


def experiment(out: str, steps: int, balance: bool) -> Experiment:
    return Experiment.from_dict({
        "name": "balance", "out_dir": out,
        "data": {"batch_size": 64, "heldout_size": 512, "train_subset": 0},
        "train": {"epochs": 2, "warmup_epochs": 2, "max_steps_per_epoch": steps, "threads": 1},
        "latency": {"profile": "flops"},
        "dist": {"workers": 2, "balance_batches": balance},
        "tracking": {"enabled": False},
    })


def worker(rank: int, port: int, out: str, steps: int, balance: bool, delay_s: float, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_WAIT_POLICY="PASSIVE")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    exp = experiment(out, steps, balance)
    splits = build_splits(exp.data, exp.space)
    if rank == 1 and delay_s > 0:
        splits = dataclasses.replace(splits, train=SlowSource(splits.train, delay_s))
    reports: list[dict] = []
    SearchLoop(exp, Comm(rank, 2), lambda m, f: reports.append(m), splits=splits, progress=False).run()
    if rank == 0:
        queue.put({"images_per_s": reports[-1]["images_per_s"], "batch_split": reports[-1]["batch_split"]})
    dist.destroy_process_group()


def run_once(out: str, steps: int, balance: bool, delay_s: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, out, steps, balance, delay_s, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench-balance-")
    delay = args.delay_ms / 1000
    runs: dict[str, list[dict]] = {"no_straggler": [], "straggler_even": [], "straggler_balanced": []}
    for _ in range(args.rounds):
        runs["no_straggler"].append(run_once(out, args.steps, False, 0.0))
        runs["straggler_even"].append(run_once(out, args.steps, False, delay))
        runs["straggler_balanced"].append(run_once(out, args.steps, True, delay))
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    print(json.dumps({
        "benchmark": "balance", "global_batch": 128, "steps_per_epoch": args.steps, "rounds": args.rounds,
        "straggler_delay_ms_per_image": args.delay_ms, "images_per_s": med,
        "balanced_over_even": med["straggler_balanced"] / med["straggler_even"],
        "balanced_over_no_straggler": med["straggler_balanced"] / med["no_straggler"],
        "balanced_over_even_per_round": [b["images_per_s"] / e["images_per_s"] for e, b in
                                         zip(runs["straggler_even"], runs["straggler_balanced"])],
        "final_split_balanced": [r["batch_split"] for r in runs["straggler_balanced"]],
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
