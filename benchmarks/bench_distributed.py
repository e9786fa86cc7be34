"""Benchmark: data-parallel scaling of the supernet search on Ray Train, and the data path. Prints one JSON object.

1. Scaling on this machine: supernet weight-step throughput (images/s) of 2 Ray Train workers x 1 thread against
   1 worker x 1 thread, the same global batch, the small space on Fashion-MNIST, warm-up phase (weight steps only),
   at each ``--global-batch`` (default 128 = 1 x 128 = 2 x 64, and 256 = 1 x 256 = 2 x 128: two workers at the
   default ``data.batch_size`` of 128 per worker). Efficiency = thr2 / (2 x thr1), target >= 0.8. Also the
   all-reduce share of the weight-step time on the 2-worker run. Each configuration runs 2 epochs of ``--steps``
   steps; the second epoch is measured (the first pays for start-up and allocator warm-up). The 2-worker run uses
   the default even batch split; a third run with the straggler-aware split (``dist.balance_batches: true``,
   :mod:`proxyless_ray.search.balance`) is reported beside it.
2. Data path: JPEG decode + augment throughput of the Parquet reader against torchvision ImageFolder + PIL on the
   same images, 1 core (``benchmarks/bench_data.py``, run in a subprocess; target >= 1.5x).

Usage: ``python benchmarks/bench_distributed.py [--global-batch 128 256] [--steps 60] [--skip-data] [--threads 1]
[--wait-policy auto]``; ``--threads`` torch threads per worker (each reserves 1 CPU, so 2 puts 4 threads on the 2
cores), ``--wait-policy`` one run per value, in turn (``auto``, ``spin``, ``passive`` or ``spin<N>``: spinning
workers with ``GOMP_SPINCOUNT=N``); ``--rounds 0`` measures only the drift-free run. The scaling
runs are interleaved ``--rounds`` times and the medians reported, so a busy machine hits both alike. Each run is a
minute or more, and on the shared development VM the host's load moves on that scale (rounds of one run differed by
0.6-0.9), so the same ratio is also measured drift-free (``interleaved``): one 2-worker Ray Train run whose workers
take turns, every ``--phase-steps`` weight steps, between rank 0 alone on the whole global batch (rank 1 asleep in a
barrier, as the second CPU is idle in a 1-worker run), both ranks on half of it each, and both ranks on the
straggler-aware split, each arm a search of its own through the product's ``SearchLoop.weight_step`` on the same
paths. Efficiency = solo seconds / (2 x two-worker seconds) for the same images, over the phases after the first
(and per phase). Two more arms split the even split's efficiency into three factors whose product it is:
``fixed_cost`` = solo whole / (2 x solo half) (rank 0 alone on half the batch: what a step costs whatever its
size), ``co_run`` = solo half / both ranks on half each without any collective (two processes sharing the
machine's caches, memory and background), and ``sync`` = those unsynchronised steps / the even split's (the
all-reduce and each step's wait for the slower rank). Beside them, per rank and arm, ``cpu_wait_share``: the share of
the training thread's time that it was ready to run but waiting for a CPU (Linux ``/proc/thread-self/schedstat``;
absent elsewhere), which is what the co-run factor loses to Ray's own processes and the host. The same drift-free
arms also run, before Ray starts, in two plain processes (``torch.multiprocessing`` and gloo over loopback, the same
``SearchLoop``; ``interleaved_without_ray``, leave out with ``--skip-plain``): the efficiency the search loop reaches
on these two vCPUs when no Ray process shares them, against which the Ray figures show what Ray's own processes cost.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import subprocess
import sys
import tempfile
import time

import ray

from proxyless_ray import runtime
from proxyless_ray.config import Experiment
from proxyless_ray.distributed.ray_trainer import ReportLog, build_trainer, connect, quiet_worker_logs, read_report_log
from proxyless_ray.runtime import WAIT_POLICIES, choose_wait_policy, thread_env

GLOBAL_BATCHES = (128, 256)  # default --global-batch


def experiment(workers: int, batch: int, steps: int, out: str, balance: bool = False, threads: int = 1,
               wait_policy: str = "auto") -> Experiment:
    return Experiment.from_dict({
        "name": f"scaling-{workers}w", "out_dir": out,
        "data": {"batch_size": batch, "heldout_size": 512, "train_subset": 0},
        "train": {"epochs": 2, "warmup_epochs": 2, "max_steps_per_epoch": steps, "threads": threads,
                  "wait_policy": wait_policy},
        "latency": {"profile": "flops"},
        "dist": {"workers": workers, "cpus_per_worker": 1, "checkpoint_every": 1000, "storage_path": out,
                 "balance_batches": balance},
        "tracking": {"enabled": False},
    })


def fit_and_read(exp: Experiment, tag: str, config: dict, out: str, **kwargs) -> list[dict]:
    """Run one Ray Train run; returns every rank's metrics of its last report."""
    n = len(os.listdir(out))
    log = os.path.join(out, f"reports-{tag}-{n}.jsonl")
    result = build_trainer(exp, f"scaling-{tag}-{n}", config, callbacks=[ReportLog(log)], **kwargs).fit()
    if result.error is not None:
        raise result.error
    return read_report_log(log)[-1]["metrics"]


def run_once(workers: int, batch: int, steps: int, out: str, balance: bool = False, **train) -> dict:
    last = fit_and_read(experiment(workers, batch, steps, out, balance, **train), f"{workers}w", {"until_epoch": 2},
                        out)
    r0 = last[0]
    return {"images_per_s": r0["weight_images_per_s"], "batch_split": r0["batch_split"],
            "allreduce_share_of_weight_steps": max(m.get("allreduce_share", 0.0) * m["epoch_s"] / m["weight_step_s"]
                                                   for m in last)}


def thread_cpu_ns() -> tuple[int, int] | None:
    """This thread's nanoseconds on a CPU and runnable but waiting for one (Linux schedstat); ``None`` elsewhere."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            run, wait = fh.read().split()[:2]
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


def interleaved_arms(exp: Experiment, rank: int, world: int, phases: int, phase_steps: int) -> dict:
    """One rank of the drift-free measurement, in an initialised process group: phases of ``phase_steps`` weight
    steps, in turn solo (rank 0 alone), even (both ranks, half the global batch each), balanced (both ranks, the
    straggler-aware split), solo on half the batch and both ranks on half each without collectives. Returns this
    rank's seconds per arm and phase, its balanced split and its CPU-wait shares."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from proxyless_ray.data.sharding import shard_batches
    from proxyless_ray.search.comm import Comm
    from proxyless_ray.search.evaluate import to_device
    from proxyless_ray.search.loop import SearchLoop

    global_batch = exp.data.batch_size * world  # the even split's: half each
    even = SearchLoop(exp, Comm(rank, world), lambda m, f: None, progress=False)
    # each arm has its own supernet, optimizer (and balancer): five searches in step, in the same processes
    loops = {"even": even,
             "balanced": SearchLoop(dataclasses.replace(exp, dist=dataclasses.replace(exp.dist, balance_batches=True)),
                                    Comm(rank, world), lambda m, f: None, splits=even.splits,
                                    latency_model=even.model, progress=False)}

    def one_worker(e: Experiment) -> SearchLoop:  # a search without collectives, on the same data and latency model
        return SearchLoop(e, Comm(), lambda m, f: None, splits=even.splits, latency_model=even.model, progress=False)

    # both ranks on half the global batch each, no collective: the even split's work without its synchronisation
    loops["unsynced"] = one_worker(exp)
    if rank == 0:  # 1-worker searches of the whole batch and of half of it
        whole = dataclasses.replace(exp, data=dataclasses.replace(exp.data, batch_size=global_batch))
        loops["solo"] = one_worker(whole)
        loops["solo_half"] = one_worker(exp)
    plan = shard_batches(len(even.splits.train), global_batch, 0, 1, 0, exp.train.seed)
    gen = torch.Generator().manual_seed(rank)

    def timed_step(loop: SearchLoop, i: int) -> float:
        lo, hi = loop.balancer.bounds(loop.comm.rank)  # this rank's slice (a 1-worker loop's: its first images)
        x, y = even.splits.train.get_batch(plan[i % len(plan)][lo:hi], True, gen)  # read outside the timing,
        x = to_device(x, even.device, even.cl)  # as the product's weight_images_per_s leaves it out
        t0 = time.perf_counter()
        loop.weight_step(x, y, 0, i)  # a fresh path each step, as in a search
        return time.perf_counter() - t0

    seconds: dict[str, list[float]] = {"solo": [], "even": [], "balanced": [], "solo_half": [], "unsynced": []}
    run_wait = {arm: [0, 0] for arm in loops}  # the training thread's ns on a CPU and waiting for one, after phase 0
    for p in range(phases):
        steps = range(p * phase_steps, (p + 1) * phase_steps)  # the same paths in every arm
        for arm, times in seconds.items():
            dist.barrier()  # in the solo phases rank 1 waits at the next one, asleep
            if arm not in loops:
                times.append(0.0)
                continue
            before = thread_cpu_ns()
            times.append(sum(timed_step(loops[arm], i) for i in steps))
            after = thread_cpu_ns()
            if p and before and after:
                run_wait[arm] = [total + b - a for total, a, b in zip(run_wait[arm], before, after)]
    wait_share = {arm: w / (r + w) for arm, (r, w) in run_wait.items() if r + w}
    return {**{f"{arm}_s": v for arm, v in seconds.items()}, "rank": rank,
            "balanced_split": list(loops["balanced"].balancer.counts), "cpu_wait_share": wait_share}


def interleaved_worker(config: dict) -> None:
    """Ray Train worker of the drift-free measurement."""
    import ray.train

    quiet_worker_logs()
    ctx = ray.train.get_context()
    ray.train.report(interleaved_arms(Experiment.from_dict(config["experiment"]), ctx.get_world_rank(),
                                      ctx.get_world_size(), config["phases"], config["phase_steps"]))


def plain_worker(rank: int, port: int, exp: Experiment, phases: int, phase_steps: int, queue) -> None:
    """The drift-free measurement's rank in a plain process: gloo over loopback, no Ray anywhere. It inherits the
    driver's OMP_WAIT_POLICY, and its ``SearchLoop`` tunes the allocator as in a Ray worker."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put(interleaved_arms(exp, rank, 2, phases, phase_steps))
    finally:
        dist.destroy_process_group()


def run_interleaved(global_batch: int, phases: int, phase_steps: int, out: str, plain: bool = False, **train) -> dict:
    """The drift-free measurement on Ray Train, or (``plain``) in two plain processes without Ray running.
    ``train``: the workers' ``threads`` and ``wait_policy``."""
    exp = experiment(2, global_batch // 2, phases * phase_steps, out, **train)  # one epoch's learning-rate schedule
    if plain:
        ranks = run_plain(exp, phases, phase_steps)
    else:
        ranks = fit_and_read(exp, "interleaved", {"phases": phases, "phase_steps": phase_steps}, out,
                             train_fn=interleaved_worker)
    ranks = sorted(ranks, key=lambda m: m["rank"])
    r0 = ranks[0]
    solo = r0["solo_s"][1:]  # the first phase of each arm pays for warm-up
    report = {"phases": phases, "phase_steps": phase_steps,
              "thr1_images_per_s": global_batch * phase_steps * len(solo) / sum(solo)}
    for arm in ("even", "balanced"):
        two = r0[f"{arm}_s"][1:]
        report[arm] = {"thr2_images_per_s": global_batch * phase_steps * len(two) / sum(two),
                       "efficiency": sum(solo) / (2 * sum(two)),
                       "efficiency_per_phase": [a / (2 * b) for a, b in zip(solo, two)]}
    report["balanced"]["final_split"] = r0["balanced_split"]
    half, unsynced, even = (sum(r0[f"{arm}_s"][1:]) for arm in ("solo_half", "unsynced", "even"))
    report["even"]["factors"] = {"fixed_cost": sum(solo) / (2 * half), "co_run": half / unsynced,
                                 "sync": unsynced / even}
    if all(m["cpu_wait_share"] for m in ranks):  # Linux
        report["cpu_wait_share"] = [m["cpu_wait_share"] for m in ranks]
    return report


def run_plain(exp: Experiment, phases: int, phase_steps: int) -> list[dict]:
    """Both ranks of the drift-free measurement as two spawned processes; every rank's report."""
    from proxyless_ray.tracking.server import free_port

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=plain_worker, args=(rank, port, exp, phases, phase_steps, queue)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    ranks: list[dict] = []
    try:
        while len(ranks) < len(procs):
            try:
                ranks.append(queue.get(timeout=5))
            except queue_module.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a plain-process rank exited with code {failed[0]}") from None
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return ranks


def scaling(global_batch: int, args: argparse.Namespace, out: str, plain: dict | None = None,
            wait_policy: str = "auto") -> dict:
    """Both scaling measurements at one global batch (1 x ``global_batch`` against 2 x half of it); only the
    drift-free one with ``--rounds 0``."""
    train = {"threads": args.threads, "wait_policy": wait_policy}
    interleaved = run_interleaved(global_batch, args.phases, args.phase_steps, out, **train)
    head = {"global_batch": global_batch, "threads_per_worker": args.threads}
    if args.rounds == 0:
        return {**head, "interleaved": interleaved, **({"interleaved_without_ray": plain} if plain else {})}
    one, two, balanced = [], [], []
    for _ in range(args.rounds):
        one.append(run_once(1, global_batch, args.steps, out, **train))
        two.append(run_once(2, global_batch // 2, args.steps, out, **train))
        balanced.append(run_once(2, global_batch // 2, args.steps, out, balance=True, **train))
    thr1 = statistics.median(r["images_per_s"] for r in one)

    def two_workers(runs: list[dict]) -> dict:  # the 2-worker runs of one split against the 1-worker runs
        thr2 = statistics.median(r["images_per_s"] for r in runs)
        return {"thr2_images_per_s": thr2, "efficiency": thr2 / (2 * thr1),
                # each round's own ratio too: the VM's speed drifts between rounds
                "efficiency_per_round": [b["images_per_s"] / (2 * a["images_per_s"]) for a, b in zip(one, runs)],
                "allreduce_share_2w": statistics.median(r["allreduce_share_of_weight_steps"] for r in runs)}

    return {**head, "steps_per_epoch": args.steps, "rounds": args.rounds, "thr1_images_per_s": thr1,
            **two_workers(two), "target_efficiency": 0.8,
            "balanced_split": two_workers(balanced),
            "runs_1w": one, "runs_2w": two, "runs_2w_balanced": balanced,
            "interleaved": interleaved, **({"interleaved_without_ray": plain} if plain else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, nargs="+", default=list(GLOBAL_BATCHES),
                        help="global batches to measure at, each split 2 x half against 1 x all")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phases", type=int, default=13, help="solo/pair phases of the drift-free measurement")
    parser.add_argument("--phase-steps", type=int, default=10)
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-plain", action="store_true", help="leave out the drift-free run without Ray")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1 CPU reserved each)")
    parser.add_argument("--wait-policy", nargs="+", default=["auto"],
                        help="train.wait_policy values to measure in turn (auto, spin, passive), or spin<N>: spin "
                             "with GOMP_SPINCOUNT=N")
    args = parser.parse_args()
    bad = [g for g in args.global_batch if g < 2 or g % 2]
    if bad:
        parser.error(f"--global-batch {bad[0]}: expected an even number of images, at least 2")
    bad = [p for p in args.wait_policy if p not in WAIT_POLICIES and not (p[:4] == "spin" and p[4:].isdigit())]
    if bad or args.threads < 1 or args.rounds < 0:
        parser.error(f"--wait-policy {bad}, --threads {args.threads}, --rounds {args.rounds}: expected policies in "
                     f"{list(WAIT_POLICIES)} or spin<N>, at least 1 thread, 0 or more rounds")
    out = tempfile.mkdtemp(prefix="bench-dist-")

    def use(policy: str) -> str:  # this policy's train.wait_policy; its variables for the plain processes
        # read when the workers' environment is built
        runtime.SPIN_COUNT = int(policy[4:]) if policy[:4] == "spin" and policy[4:] else default_spin
        setting = "spin" if policy.startswith("spin") else policy
        chosen = choose_wait_policy(setting, args.threads, 2, os.cpu_count() or 2)[0]
        os.environ.update(thread_env(chosen == "passive"))
        return setting

    default_spin = runtime.SPIN_COUNT
    # before Ray starts, so that none of its processes run beside the plain ones
    plain = {} if args.skip_plain else {
        (p, g): run_interleaved(g, args.phases, args.phase_steps, out, plain=True, threads=args.threads,
                                wait_policy=use(p))
        for p in args.wait_policy for g in args.global_batch}
    connect(experiment(1, 128, args.steps, out), num_cpus=2)  # the embedded cluster `proxyless-ray search` starts
    try:
        results = []
        for p in args.wait_policy:
            setting = use(p)
            spin = thread_env(False)["GOMP_SPINCOUNT"]  # what a spinning worker gets
            results += [{"wait_policy": p, "spin_count": spin, **scaling(g, args, out, plain.get((p, g)), setting)}
                        for g in args.global_batch]
    finally:
        ray.shutdown()
    report = {"benchmark": "distributed", "scaling": results, "load_average": os.getloadavg()}
    if not args.skip_data:
        here = os.path.dirname(os.path.abspath(__file__))
        data = subprocess.run([sys.executable, os.path.join(here, "bench_data.py")], capture_output=True, text=True,
                              check=True)
        report["data_path"] = json.loads(data.stdout.strip().splitlines()[-1])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
