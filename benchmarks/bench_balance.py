"""Benchmark: the straggler-aware batch split against the even split when one of 2 workers is slower. Prints JSON.

Two gloo processes run the product's search loop (small space, Fashion-MNIST, global batch 128, 1 thread each,
warm-up phase, ``--steps`` steps per epoch, the second epoch measured). Rank 1 is made a straggler by a delay per
image it reads (``--delay-ms``; 1 ms per image makes it about 1.5x slower on the development VM), standing in for a
slower node or a shared core. Three configurations, interleaved ``--rounds`` times: no straggler (even split), a
straggler with the even split (the default), a straggler with the balanced split (:mod:`proxyless_ray.search.balance`).
Throughput is rank 0's epoch images/s (waiting for the straggler included).

``--busy`` asks another question: what a real busy process on one of the cores (``while True: pass``, another job)
leaves to each way of using 2 cores. Three configurations run quiet and beside the busy process, interleaved: one
process of 2 torch threads (spinning, as ``auto`` gives a process that owns its cores, with the thread governor on,
as shipped), 2 single-thread workers with the even split, and with the balanced split; all at global batch 128.

Usage: ``python benchmarks/bench_balance.py [--steps 40] [--rounds 2] [--delay-ms 1.0] [--busy]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
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


def experiment(out: str, steps: int, balance: bool, world: int = 2, threads: int = 1) -> Experiment:
    return Experiment.from_dict({
        "name": "balance", "out_dir": out,
        "data": {"batch_size": 128 // world, "heldout_size": 512, "train_subset": 0},
        "train": {"epochs": 2, "warmup_epochs": 2, "max_steps_per_epoch": steps, "threads": threads},
        "latency": {"profile": "flops"},
        "dist": {"workers": world if world > 1 else 0, "balance_batches": balance},
        "tracking": {"enabled": False},
    })


def worker(rank: int, port: int, out: str, steps: int, balance: bool, delay_s: float, queue, world: int = 2,
           threads: int = 1) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    exp = experiment(out, steps, balance, world, threads)
    splits = build_splits(exp.data, exp.space)
    if rank == 1 and delay_s > 0:
        splits = dataclasses.replace(splits, train=SlowSource(splits.train, delay_s))
    reports: list[dict] = []
    SearchLoop(exp, Comm(rank, world), lambda m, f: reports.append(m), splits=splits, progress=False).run()
    if rank == 0:
        queue.put({"images_per_s": reports[-1]["images_per_s"], "batch_split": reports[-1].get("batch_split")})
    if world > 1:
        dist.destroy_process_group()


def run_once(out: str, steps: int, balance: bool, delay_s: float, world: int = 2, threads: int = 1,
             busy: bool = False) -> dict:
    """One run; the processes inherit the OpenMP wait policy their thread count gets from ``auto`` (libgomp reads
    it when torch loads, in the spawned process)."""
    from proxyless_ray.runtime import THREAD_ENV_KEYS, thread_env

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    saved = {k: os.environ.get(k) for k in THREAD_ENV_KEYS}
    os.environ.update(thread_env(False))  # each process owns its cores when quiet: spin, as auto chooses
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    procs = [ctx.Process(target=worker, args=(r, port, out, steps, balance, delay_s, queue, world, threads))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        return queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=60)
        if hog is not None:
            hog.kill()
            hog.wait()
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def busy_main(out: str, steps: int, rounds: int) -> dict:
    configs = {"one_process_2_threads": (1, 2, False), "two_workers_even": (2, 1, False),
               "two_workers_balanced": (2, 1, True)}
    runs: dict[str, list[dict]] = {f"{c}{b}": [] for c in configs for b in ("", "+busy")}
    for r in range(rounds):
        for name, (world, threads, balance) in list(configs.items())[r % 3:] + list(configs.items())[:r % 3]:
            for busy in (False, True):
                runs[f"{name}{'+busy' if busy else ''}"].append(
                    run_once(out, steps, balance, 0.0, world, threads, busy))
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    return {"benchmark": "balance", "mode": "busy", "global_batch": 128, "steps_per_epoch": steps, "rounds": rounds,
            "images_per_s": med,
            "quiet_over_busy": {c: med[c] / med[f"{c}+busy"] for c in configs},
            "busy_over_quiet_one_process": {c: med["one_process_2_threads"] / med[f"{c}+busy"] for c in configs},
            "final_split_balanced_busy": [r["batch_split"] for r in runs["two_workers_balanced+busy"]],
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--busy", action="store_true", help="a busy process instead of a slowed reader (docstring)")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench-balance-")
    if args.busy:
        print(json.dumps(busy_main(out, args.steps, args.rounds)))
        return
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
