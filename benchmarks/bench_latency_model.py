"""Benchmark: do the hardware profiles predict real latency? Prints one JSON object.

1. CPU: sample random architectures from the ``small`` space (28 px) and the paper's ImageNet space (224 px,
   batch 1), measure each whole network with torch here (1 thread by default, the same timer and statistic as
   the profile), and compare with the profile's prediction: Spearman rank correlation (target >= 0.9) and mean
   absolute percentage error (target <= 15 %), per space.
2. Mobile: price the published ProxylessNAS-Mobile network (``../shared/reference/proxylessnas``, loaded through
   the same config converter) on the ``pixel1`` profile; target: within 10 % of the published 78 ms on a Pixel 1.
3. Cross-hardware table: the three published ProxylessNAS networks (gpu, cpu, mobile) priced on every shipped
   profile.
4. Local CPU (``cpu_local``): profile the ``small`` space here in quick mode and in full mode, in the same run,
   then measure random networks of the space (median of repeats, interleaved rounds): Spearman (target >= 0.9)
   and MAPE (target <= 15 %) of the quick profile against those medians, the quick profile's time (target <= 90 s
   on 2 cores) and how far its predictions are from the full profile's (target <= 10 %).

Usage: ``python benchmarks/bench_latency_model.py [--profile cpu_1thread] [--quick] [--local-only]``. On a shared
machine, other processes distort wall-clock times; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from proxyless_ray.latency.check import measure_network
from proxyless_ray.latency.fingerprint import describe, machine_fingerprint
from proxyless_ray.latency.local import quick_settings
from proxyless_ray.latency.model import arch_latency
from proxyless_ray.latency.profile import list_profiles, load_profile
from proxyless_ray.latency.profiler import ProfilerSettings, profile_spaces, robust_stats
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.nn.space import space_from_preset
from proxyless_ray.runtime import tune_allocator

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PUBLISHED = {"mobile": ("proxyless_mobile.config", 78.0, "Pixel 1, TFLite, batch 1 (ProxylessNAS paper / README)"),
             "gpu": ("proxyless_gpu.config", 5.1, "V100, batch 8 (ProxylessNAS paper / README)"),
             "cpu": ("proxyless_cpu.config", None, "2x Xeon E5-2640 v4, batch 1 (not verified)")}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def time_fn(fn, settings: ProfilerSettings) -> list[float]:
    """Warm up, then time ``fn`` (ms, on the settings' clock) at least ``repeats`` times and ``min_time_s``."""
    now = time.thread_time if settings.clock == "thread" else time.perf_counter
    for _ in range(settings.warmup):
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + settings.min_time_s
    while len(samples) < settings.repeats or (time.perf_counter() < t_end and len(samples) < settings.max_repeats):
        t0 = now()
        fn()
        samples.append((now() - t0) * 1e3)
    return samples


def measure_networks(archs: list[Arch], settings: ProfilerSettings) -> list[dict[str, float]]:
    """End-to-end forward latency (ms) of each network at batch 1, timed in ``settings.rounds`` interleaved passes
    so that a drifting shared machine affects all networks alike: the chosen statistic, median and min."""
    tune_allocator()  # the profiles were measured with it
    share = replace(settings, repeats=-(-settings.repeats // settings.rounds),
                    min_time_s=settings.min_time_s / settings.rounds)
    nets = [ProxylessNet(a).eval() for a in archs]
    inputs = [torch.randn(settings.batch_size, a.in_chs, a.resolution, a.resolution) for a in archs]
    samples: list[list[float]] = [[] for _ in archs]
    order = list(range(len(archs)))
    shuffle = random.Random(1234)
    with torch.inference_mode():
        for r in range(settings.rounds):
            for i in order:  # a new order every round: periodic load from other jobs hits no network twice alike
                net, x = nets[i], inputs[i]
                warm = replace(share, warmup=settings.warmup if r == 0 else 1)
                samples[i] += time_fn(lambda net=net, x=x: net(x), warm)
            shuffle.shuffle(order)
            print(f"  round {r + 1}/{settings.rounds} over {len(archs)} networks", file=sys.stderr)
    return [{"ms": robust_stats(s, settings.statistic)[0], "median_ms": robust_stats(s)[0], "min_ms": min(s),
             "runs": len(s)} for s in samples]


def cpu_check(profile_name: str, preset: str, n: int, seed: int, settings: ProfilerSettings) -> dict:
    profile = load_profile(profile_name)
    space = space_from_preset(preset)
    rng = random.Random(seed)
    archs = [space.sample(rng, name=f"{preset}_{i}") for i in range(n)]
    pred, sources = [], {"exact": 0, "predicted": 0, "zero": 0}
    for arch in archs:
        p = 0.0
        for layer in arch.layers():
            ms, src = profile.lookup(layer.block, layer.in_chs, layer.resolution)
            p += ms
            sources[src] += 1
        pred.append(p)
    measured = measure_networks(archs, settings)
    pred_a = np.array(pred)
    meas_a = np.array([m["ms"] for m in measured])
    med_a = np.array([m["median_ms"] for m in measured])
    mape = float(np.mean(np.abs(pred_a - meas_a) / meas_a) * 100)
    rho = spearman(pred_a, meas_a)
    return {
        "space": preset, "resolution": space.resolution, "n": n, "statistic": settings.statistic,
        "clock": settings.clock,
        "spearman": round(rho, 4), "mape_pct": round(mape, 2),
        "mean_pred_over_measured": round(float(np.mean(pred_a / meas_a)), 4),
        "spearman_vs_median": round(spearman(pred_a, med_a), 4),
        "mape_vs_median_pct": round(float(np.mean(np.abs(pred_a - med_a) / med_a) * 100), 2),
        "measured_ms_range": [round(float(meas_a.min()), 3), round(float(meas_a.max()), 3)],
        "predicted_ms_range": [round(float(pred_a.min()), 3), round(float(pred_a.max()), 3)],
        "runs_per_network": int(np.median([m["runs"] for m in measured])),
        "layer_sources": sources,
        "pass": bool(rho >= 0.9 and mape <= 15.0),
        "networks": [{"predicted_ms": round(p, 3), "measured_ms": round(m["ms"], 3),
                      "median_ms": round(m["median_ms"], 3)} for p, m in zip(pred, measured)],
    }


def local_check(n: int, seed: int, threads: int, full: ProfilerSettings, measure: ProfilerSettings) -> dict:
    """Quick and full local profiles of the ``small`` space, then ``n`` random networks measured here (medians)."""
    space = space_from_preset("small")
    rng = random.Random(seed)
    archs = [space.sample(rng, name=f"small_{i}") for i in range(n)]
    # A drifting shared machine shifts whole phases: one reference network timed before each phase shows by how much
    ref = space.sample(random.Random(seed + 1), name="reference")
    drift = {}

    def reference(phase: str) -> None:
        drift[phase] = round(measure_network(ref, threads=threads, min_time_s=1.0, clock=measure.clock)["ms"], 3)

    reference("before_quick_profile")
    t0 = time.perf_counter()
    quick = profile_spaces([space], quick_settings(threads), "cpu_local", progress=False)
    quick_s = time.perf_counter() - t0
    reference("before_full_profile")
    t0 = time.perf_counter()
    fullp = profile_spaces([space], full, "cpu_local_full", progress=False)
    full_s = time.perf_counter() - t0
    pq = np.array([arch_latency(quick, a)[0] for a in archs])
    pf = np.array([arch_latency(fullp, a)[0] for a in archs])
    reference("before_networks")
    med = np.array([m["median_ms"] for m in measure_networks(archs, replace(measure, statistic="median"))])
    reference("after_networks")

    def fit(pred: np.ndarray) -> dict:
        return {"spearman": round(spearman(pred, med), 4),
                "mape_pct": round(float(np.mean(np.abs(pred - med) / med) * 100), 2),
                "mean_pred_over_measured": round(float(np.mean(pred / med)), 4)}

    agree = np.abs(pq - pf) / pf * 100
    q = fit(pq)
    return {
        "space": "small", "n": n, "threads": threads, "clock": measure.clock,
        "machine": describe(machine_fingerprint("cpu", threads)),
        "quick_profile_s": round(quick_s, 1), "full_profile_s": round(full_s, 1),
        "quick_settings": {k: v for k, v in vars(quick_settings(threads)).items() if k not in ("device",)},
        "full_settings": {k: v for k, v in vars(full).items() if k not in ("device",)},
        "quick_vs_measured_median": q, "full_vs_measured_median": fit(pf),
        "quick_vs_full_mean_abs_pct": round(float(agree.mean()), 2),
        "quick_vs_full_max_abs_pct": round(float(agree.max()), 2),
        "measured_median_ms_range": [round(float(med.min()), 3), round(float(med.max()), 3)],
        "reference_network_ms": drift,
        "pass": bool(q["spearman"] >= 0.9 and q["mape_pct"] <= 15.0 and quick_s <= 90 and agree.max() <= 10.0),
        "networks": [{"quick_ms": round(float(a), 3), "full_ms": round(float(b), 3), "median_ms": round(float(c), 3)}
                     for a, b, c in zip(pq, pf, med)],
    }


def mobile_check(profile_name: str) -> dict:
    path = REFERENCE / "proxylessnas" / PUBLISHED["mobile"][0]
    if not path.is_file():
        return {"skipped": f"{path} is absent"}
    profile = load_profile(profile_name)
    arch = Arch.load(path)
    total, _ = arch_latency(profile, arch)
    out = {"profile": profile_name, "network": "ProxylessNAS-Mobile", "predicted_ms": round(total, 2),
           "published_ms": 78.0, "error_pct": round((total / 78.0 - 1) * 100, 2),
           "pass": bool(abs(total / 78.0 - 1) <= 0.10)}
    scale = getattr(profile.predictor, "scale", 1.0)
    if scale != 1.0:
        out["uncalibrated_ms"] = round(total / scale, 2)
        out["calibration"] = {"scale": scale, **dict(profile.predictor.calibration)}
    mobile_14 = REFERENCE / "proxylessnas" / "proxyless_mobile_14.config"
    if mobile_14.is_file():
        out["mobile_14"] = {"predicted_ms": round(arch_latency(profile, Arch.load(mobile_14))[0], 2),
                            "published_ms": 147.0}
    return out


def cross_table() -> dict:
    folder = REFERENCE / "proxylessnas"
    if not folder.is_dir():
        return {"skipped": f"{folder} is absent"}
    profiles = {name: load_profile(name) for name in sorted(list_profiles())}
    table = {}
    for net, (fname, published, where) in PUBLISHED.items():
        arch = Arch.load(folder / fname)
        row = {name: round(arch_latency(p, arch)[0], 3) for name, p in profiles.items()}
        row["published_ms"] = published
        row["published_on"] = where
        table[f"proxyless_{net}"] = row
    units = {name: f"ms at batch {p.metadata['batch_size']}, {p.metadata['device']}" for name, p in profiles.items()}
    return {"rows": table, "columns": units}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu_1thread")
    parser.add_argument("--mobile-profile", default="pixel1")
    parser.add_argument("--n-small", type=int, default=30)
    parser.add_argument("--n-imagenet", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--statistic", help="timing statistic (default: the profile's own)")
    parser.add_argument("--clock", choices=("wall", "thread"), help="timing clock (default: the profile's own)")
    parser.add_argument("--quick", action="store_true", help="few archs and runs (smoke test)")
    parser.add_argument("--local-only", action="store_true", help="only the local CPU check (4.)")
    parser.add_argument("--n-local", type=int, default=30, help="random networks of the local check")
    parser.add_argument("--local-threads", type=int, default=1, help="torch threads of the local check")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    statistic = args.statistic or profile.metadata.get("statistic", "median")
    clock = args.clock or profile.metadata.get("clock", "wall")
    threads = int(profile.metadata["threads"])
    torch.set_num_threads(threads)
    small = ProfilerSettings(threads=threads, warmup=5, repeats=40, min_time_s=1.0, rounds=5, statistic=statistic,
                             clock=clock)
    big = ProfilerSettings(threads=threads, warmup=2, repeats=20, min_time_s=2.0, rounds=5, statistic=statistic,
                           clock=clock)
    lt = args.local_threads
    lclock = quick_settings(lt).clock  # the full profile and the networks are timed on the quick profile's clock
    full_local = ProfilerSettings(threads=lt, warmup=10, repeats=100, min_time_s=2.0, rounds=5, statistic="median",
                                  clock=lclock)
    measure_local = ProfilerSettings(threads=lt, warmup=5, repeats=40, min_time_s=1.0, rounds=5, statistic="median",
                                     clock=lclock)
    n_small, n_big, n_local = args.n_small, args.n_imagenet, args.n_local
    if args.quick:
        n_small, n_big, n_local = 5, 2, 5
        small = ProfilerSettings(threads=threads, warmup=1, repeats=3, min_time_s=0.0, statistic=statistic,
                                 clock=clock)
        big = small
        full_local = measure_local = ProfilerSettings(threads=lt, warmup=1, repeats=3, min_time_s=0.0, clock=lclock)
    load_before = os.getloadavg()
    t0 = time.time()
    result = {
        "benchmark": "latency_model",
        "machine": {"cpu": describe(machine_fingerprint("cpu", lt)), "torch": str(torch.__version__),
                    "threads": threads, "loadavg_before": [round(v, 2) for v in load_before]},
    }
    if not args.local_only:
        result.update({
            "profile": args.profile, "profile_measured": profile.metadata.get("date"),
            "cpu": [cpu_check(args.profile, "small", n_small, args.seed, small),
                    cpu_check(args.profile, "proxyless_imagenet", n_big, args.seed, big)],
            "mobile": mobile_check(args.mobile_profile),
            "published_networks": cross_table(),
        })
    torch.set_num_threads(lt)
    result["local"] = local_check(n_local, args.seed, lt, full_local, measure_local)
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.time() - t0, 1)
    result["targets_met"] = {"cpu_" + c["space"]: c["pass"] for c in result.get("cpu", [])}
    if "mobile" in result:
        result["targets_met"]["mobile"] = result["mobile"].get("pass")
    result["targets_met"]["local_quick"] = result["local"]["pass"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
