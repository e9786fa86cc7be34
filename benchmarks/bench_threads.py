"""Benchmark: the OpenMP wait policy and thread count of a training process, quiet and beside a busy process.

libgomp (torch's OpenMP runtime on Linux) reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when it loads, so
every cell runs in a fresh interpreter with its environment set before torch is imported. A cell is one step kind
of the search (``weight``: ``SearchLoop.weight_step``; ``two`` / ``full_v2``: ``SearchLoop._arch_step`` in that gate
mode; ``child``: the derived network's training step, ``RetrainLoop.run``'s loop body) in one setting (``A``: the
paper's ImageNet space at 224 px, batch 8, 1000 classes; ``B``: 64 px, batch 32, 10 classes), on a fixed random
batch, with a thread count, a memory layout and a policy (``matmul``: one 1536 x 1536 float matrix product, an op
coarse enough that how threads wait hardly matters, the reference for what any step can keep beside a busy
process):

* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once after each parallel region);
* ``unset``: libgomp's default (spin a while, then sleep; less spinning when it sees more threads than CPUs);
* ``active``: ``OMP_WAIT_POLICY=ACTIVE`` (spin);
* ``spin<N>``: ``GOMP_SPINCOUNT=N`` (spin N iterations, then sleep);
* what :func:`proxyless_ray.runtime.thread_env` gives for ``owner`` and ``shared`` placements;
* ``adaptive``: ``owner``'s spinning threads with :class:`proxyless_ray.runtime.ThreadGovernor` checking the other
  processes' load every 0.5 s (the search's ``train.adapt_threads``); its warm-up lasts until the first check.

``--load`` adds, per cell, a run beside one busy single-threaded process (another job on one of the cores). Cells
are interleaved round by round (rotating order) and each reports the median step time (wall clock) and the process
CPU time per step over wall time (``cpu_per_wall``: about 2 when two threads spin, nearer 1 when they sleep), which
shows whether the policy took effect, ``thread_cores``: the cores each of the cell's threads took over its timed
steps, busiest first (beside a busy process it shows whether the team got more than the one free core), and
``foreign_cores_max``: the cores that other processes than the cell's took while it ran (a few hundredths on a
quiet machine; more flags a cell someone else's job slowed).

Usage: ``python benchmarks/bench_threads.py [--cells A:child:2:passive,...] [--load] [--steps 8] [--rounds 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

SETTINGS = {"A": (224, 8, 1000), "B": (64, 32, 10)}  # resolution, batch, classes
KINDS = ("weight", "two", "full_v2", "child", "matmul")
POLICIES = ("passive", "unset", "active", "owner", "shared", "adaptive")
DEFAULT_CELLS = ("A:child:1:owner,A:child:2:owner,A:child:2:passive,A:child:2:unset,A:full_v2:2:owner,"
                 "A:full_v2:2:passive,B:child:2:owner,B:child:2:passive")
BUSY = "while True: pass"
MATMUL_N = 1536


def policy_env(policy: str) -> dict[str, str | None]:
    """The variables a cell sets (``None``: removed) for ``policy``."""
    from proxyless_ray.runtime import THREAD_ENV_KEYS, thread_env

    if policy in ("owner", "shared", "adaptive"):
        env = thread_env(policy == "shared")
    elif policy.startswith("spin"):
        env = {"GOMP_SPINCOUNT": policy[4:]}
    else:
        env = {} if policy == "unset" else {"OMP_WAIT_POLICY": policy.upper()}
    return {k: env.get(k) for k in THREAD_ENV_KEYS}


# -- the worker (a fresh interpreter per cell) ---------------------------------------------------------------------


def build_step(setting: str, kind: str, threads: int, channels_last: bool):
    """The step function of one cell; everything is built before it is returned."""
    import torch
    from torch import nn

    if kind == "matmul":  # one coarse op, barely any waiting between parallel regions: the floor beside a busy core
        torch.set_num_threads(threads)
        a = torch.randn(MATMUL_N, MATMUL_N)
        return lambda: a @ a

    from proxyless_ray.config import DataConfig, DistConfig, Experiment, LatencyConfig, TrackingConfig, TrainConfig
    from proxyless_ray.data import Splits
    from proxyless_ray.distributed.retrain import RetrainLoop
    from proxyless_ray.nn.space import space_from_preset
    from proxyless_ray.search.comm import Comm
    from proxyless_ray.search.loop import SearchLoop

    res, batch, classes = SETTINGS[setting]
    space = space_from_preset("proxyless_imagenet", resolution=res, num_classes=classes)
    train = TrainConfig(epochs=1, warmup_epochs=0, arch_update_every=1, seed=0, threads=threads,
                        channels_last=channels_last, gate_mode="full_v2" if kind == "full_v2" else "two")
    exp = Experiment(name="bench_threads", space=space, data=DataConfig(batch_size=batch, eval_batch_size=batch),
                     train=train, latency=LatencyConfig(profile="flops"), dist=DistConfig(workers=0),
                     tracking=TrackingConfig(enabled=False))
    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, classes, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    class Fixed:  # an in-memory BatchSource that always hands out the same batch
        def __len__(self) -> int:
            return batch * 100

        def get_batch(self, indices, train, generator=None):
            return x, y

    splits = Splits(train=Fixed(), heldout=Fixed(), test=Fixed(), num_classes=classes, in_chs=3, resolution=res,
                    name="fixed")
    loop = SearchLoop(exp, Comm(), lambda m, c: None, splits=splits, progress=False)
    counter = iter(range(10**9))
    if kind == "weight":
        return lambda: loop.weight_step(x, y, 0, next(counter))
    if kind in ("two", "full_v2"):
        return lambda: loop._arch_step(0, next(counter), 0)
    choices = loop.state.net.sample_for_arch(loop.mode, torch.Generator().manual_seed(0))
    arch = space.arch_from_choices(choices).without_zeros()
    rl = RetrainLoop(exp, arch, Comm(), lambda m, r: None, splits=splits, progress=False)
    net, opt = rl.net.train(), rl.opt

    def child() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y, label_smoothing=exp.train.label_smoothing)
        loss.backward()
        opt.step()

    return child


def thread_ticks() -> dict[int, int]:
    """CPU clock ticks (user + system) of each thread of this process (Linux; empty elsewhere)."""
    ticks = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, ValueError, IndexError):
        return {}
    return ticks


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from proxyless_ray.runtime import ThreadGovernor

    step = build_step(spec["setting"], spec["kind"], spec["threads"], spec["channels_last"])
    gov = ThreadGovernor(spec.get("policy") == "adaptive", every_s=0.5)
    for i in range(spec["warmup"] + 20):
        if i >= spec["warmup"] and (gov.checks or not gov.enabled):
            break
        step()
        gov.tick()
    wall, cpu = [], []
    ticks_0, t_0 = thread_ticks(), time.perf_counter()
    for _ in range(spec["steps"]):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        gov.tick()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    span, ticks_1 = time.perf_counter() - t_0, thread_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    shares = sorted(((ticks_1[t] - ticks_0.get(t, 0)) / hz / span for t in ticks_1), reverse=True)
    return {"wall_ms": wall, "cpu_ms": cpu, "torch_threads": torch.get_num_threads(), "thread_changes": gov.changes,
            "thread_cores": [round(c, 2) for c in shares if c >= 0.02],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}


# -- the driver ----------------------------------------------------------------------------------------------------


def busy_cpu_s() -> float | None:
    """Seconds all CPUs of this machine have been busy (Linux ``/proc/stat``); ``None`` elsewhere."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cell(cell: str, loaded: bool, steps: int, warmup: int) -> dict[str, Any]:
    setting, kind, threads, policy, *layout = cell.split(":")
    spec = {"setting": setting, "kind": kind, "threads": int(threads), "steps": steps, "warmup": warmup,
            "channels_last": (layout or ["cl"])[0] != "nchw", "policy": policy}
    env = dict(os.environ)
    for key, value in policy_env(policy).items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    busy_0, ours_0, t0 = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if loaded else None
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                             capture_output=True, text=True, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    busy_1, ours_1, wall = busy_cpu_s(), children_cpu_s(), time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"cell {cell} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # cores taken by processes other than this cell's (the worker and the busy one) while it ran: a quiet machine
    # shows a few hundredths; more means someone else's job was timed too
    if busy_0 is not None and busy_1 is not None:
        res["foreign_cores"] = max(busy_1 - busy_0 - (ours_1 - ours_0), 0.0) / wall
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS,
                        help="comma list of SETTING:KIND:THREADS:POLICY[:nchw], e.g. A:child:2:owner")
    parser.add_argument("--load", action="store_true", help="also run every cell beside a busy process")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians pool their steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        parts = c.split(":")
        if (len(parts) not in (4, 5) or parts[0] not in SETTINGS or parts[1] not in KINDS
                or not (parts[3] in POLICIES or parts[3][4:].isdigit()) or parts[4:] not in ([], ["nchw"], ["cl"])):
            raise SystemExit(f"bad cell {c!r}; expected SETTING:KIND:THREADS:POLICY[:nchw|cl] with SETTING in "
                             f"{sorted(SETTINGS)}, KIND in {'|'.join(KINDS)}, POLICY in {list(POLICIES)}")
    runs = [(c, False) for c in cells] + ([(c, True) for c in cells] if args.load else [])
    samples: dict[str, dict[str, list[float]]] = {}
    load: list[float] = []
    t_start = time.perf_counter()
    for r in range(args.rounds):
        k = r % len(runs)
        for cell, loaded in runs[k:] + runs[:k]:
            res = run_cell(cell, loaded, args.steps, args.warmup)
            s = samples.setdefault(f"{cell}{'+busy' if loaded else ''}",
                                   {"wall_ms": [], "cpu_ms": [], "foreign": [], "threads": [],
                                    "thread_cores": []})
            s["threads"].append(res["torch_threads"])
            s["thread_cores"].append(res["thread_cores"])
            s["wall_ms"] += res["wall_ms"]
            s["cpu_ms"] += res["cpu_ms"]
            s["foreign"].append(res.get("foreign_cores", 0.0))
            load.append(round(os.getloadavg()[0], 2))
            print(f"{cell}{' +busy' if loaded else ''}: {statistics.median(res['wall_ms']):.1f} ms "
                  f"(policy {res['omp_wait_policy']}, spincount {res['gomp_spincount']}, other processes "
                  f"{res.get('foreign_cores', 0.0):.2f} cores, torch threads {res['torch_threads']}, cores per thread "
                  f"{res['thread_cores']})",
                  file=sys.stderr, flush=True)
    result: dict[str, Any] = {"benchmark": "bench_threads", "steps": args.steps, "warmup": args.warmup,
                              "rounds": args.rounds, "load_1min_after_each_cell": load,
                              "env": {p: policy_env(p) for p in POLICIES}, "median_ms": {}, "cpu_per_wall": {},
                              "foreign_cores_max": {}, "torch_threads_at_end": {}, "thread_cores": {}}
    for name, s in samples.items():
        result["median_ms"][name] = round(statistics.median(s["wall_ms"]), 1)
        result["cpu_per_wall"][name] = round(sum(s["cpu_ms"]) / sum(s["wall_ms"]), 2)
        result["foreign_cores_max"][name] = round(max(s["foreign"]), 2)
        result["torch_threads_at_end"][name] = s["threads"]
        result["thread_cores"][name] = s["thread_cores"]
    med = result["median_ms"]
    result["busy_over_quiet"] = {c: round(med[f"{c}+busy"] / med[c], 3) for c in cells if f"{c}+busy" in med}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
