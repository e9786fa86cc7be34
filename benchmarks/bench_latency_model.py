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
   then measure two sets of networks of the space together (median of repeats, interleaved rounds):
   ``uniform`` (every layer drawn uniformly, as the random-search baseline) and ``stratified`` (network ``i`` of
   ``n`` drops each optional layer with probability ``i / (n - 1)``: deep to shallow). Uniform networks all have
   about the same depth, so their latencies span a narrow band where timing noise decides the ranks; the
   stratified set spans the range a latency-constrained search explores and ranks a Pareto front on, so it is the
   set the Spearman >= 0.9 / MAPE <= 15 % targets are judged on; the uniform set's figures are reported too.
   Also: the quick profile's time (target <= 90 s on 2 cores), how far its predictions are from the full
   profile's (target <= 10 %), and what one scale fitted on a few networks (``latency --check --calibrate``)
   would change.

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

from proxyless_ray.latency.check import CheckRow, fit_scale, measure_network, measure_networks
from proxyless_ray.latency.fingerprint import describe, machine_fingerprint
from proxyless_ray.latency.local import quick_settings
from proxyless_ray.latency.model import arch_latency
from proxyless_ray.latency.profile import list_profiles, load_profile
from proxyless_ray.latency.profiler import ProfilerSettings, profile_spaces
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.space import space_from_preset

# the published files beside the checkout, or where $PROXYLESS_REFERENCE_DIR points (as for the tests)
REFERENCE = Path(os.environ.get("PROXYLESS_REFERENCE_DIR")
                 or Path(__file__).resolve().parents[2] / "shared" / "reference")
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


def measure_archs(archs: list[Arch], settings: ProfilerSettings) -> list[dict[str, float]]:
    """End-to-end forward latency (ms) of each network at batch 1, as ``latency --check`` times it: every network
    gets its share of each of ``settings.rounds`` interleaved windows, so that a drifting shared machine affects all
    networks alike: the chosen statistic, median and min."""
    out = measure_networks(archs, settings.device, settings.threads, settings.batch_size, settings.statistic,
                           settings.min_time_s, settings.repeats, settings.warmup, settings.clock,
                           rounds=settings.rounds)
    print(f"  {settings.rounds} rounds over {len(archs)} networks", file=sys.stderr)
    return [{"ms": m["ms"], "median_ms": m["median_ms"], "runs": m["count"]} for m in out]


def stratified_archs(space, n: int, seed: int, name: str) -> list[Arch]:
    """``n`` networks of ``space`` spread over its latency range: network ``i`` drops each layer that may be zero
    with probability ``i / (n - 1)`` and otherwise draws a non-zero candidate uniformly, so depth runs from the
    deepest to the shallowest, as the networks a latency-constrained search compares do."""
    rng = random.Random(seed)
    archs = []
    for i in range(n):
        p_zero = i / max(n - 1, 1)
        blocks = []
        for slot in space.slots():
            ops = [c for c in slot.candidates if c != "zero"]
            blocks.append("zero" if len(ops) < len(slot.candidates) and rng.random() < p_zero else rng.choice(ops))
        archs.append(space.arch_from_blocks(blocks, name=f"{name}_{i}"))
    return archs


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
    measured = measure_archs(archs, settings)
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
    """Quick and full local profiles of the ``small`` space, then ``n`` uniformly random and ``n`` stratified networks
    (:func:`stratified_archs`) measured here together (medians of interleaved rounds)."""
    space = space_from_preset("small")
    rng = random.Random(seed)
    sets = {"uniform": [space.sample(rng, name=f"small_{i}") for i in range(n)],
            "stratified": stratified_archs(space, n, seed + 2, "small_depth")}
    archs = sets["uniform"] + sets["stratified"]
    # A drifting shared machine shifts whole phases: one reference network timed before each phase shows by how much
    ref = space.sample(random.Random(seed + 1), name="reference")
    drift = {}

    def reference(phase: str) -> None:
        drift[phase] = round(measure_network(ref, threads=threads, min_time_s=1.0, clock=measure.clock,
                                             rounds=5)["ms"], 3)

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
    med = np.array([m["median_ms"] for m in measure_archs(archs, replace(measure, statistic="median"))])
    reference("after_networks")
    parts = {"uniform": slice(0, n), "stratified": slice(n, 2 * n)}

    def fit(pred: np.ndarray, part: slice) -> dict:
        p, m = pred[part], med[part]
        return {"spearman": round(spearman(p, m), 4), "mape_pct": round(float(np.mean(np.abs(p - m) / m) * 100), 2),
                "mean_pred_over_measured": round(float(np.mean(p / m)), 4)}

    agree = np.abs(pq - pf) / pf * 100
    q = {k: fit(pq, v) for k, v in parts.items()}
    # Would one scale from a few networks measured end to end (``latency --check --calibrate``) help? Fitted on
    # every 4th stratified network, scored on the others (measured in the same phase: an optimistic case)
    calib = [n + i for i in range(0, n, 4)]
    rows = [CheckRow(str(i), float(pq[i]), float(med[i]), 0.0, 1) for i in calib]
    sfit = fit_scale(rows)
    rest = np.array([i for i in range(n, 2 * n) if i not in calib])
    held = {"networks_fitted": len(calib), "scale": round(sfit.scale, 4),
            "loo_mape_pct": None if sfit.loo_mape is None else round(sfit.loo_mape, 2),
            "held_out_mape_before_pct": round(float(np.mean(np.abs(pq[rest] - med[rest]) / med[rest]) * 100), 2),
            "held_out_mape_after_pct": round(float(np.mean(np.abs(sfit.scale * pq[rest] - med[rest]) / med[rest])
                                                   * 100), 2)}
    met = {k: bool(v["spearman"] >= 0.9 and v["mape_pct"] <= 15.0) for k, v in q.items()}
    return {
        "space": "small", "n_per_set": n, "threads": threads, "clock": measure.clock,
        "machine": describe(machine_fingerprint("cpu", threads)),
        "quick_profile_s": round(quick_s, 1), "full_profile_s": round(full_s, 1),
        "quick_settings": {k: v for k, v in vars(quick_settings(threads)).items() if k not in ("device",)},
        "full_settings": {k: v for k, v in vars(full).items() if k not in ("device",)},
        "measure_settings": {k: v for k, v in vars(measure).items() if k not in ("device",)},
        "quick_vs_measured_median": q, "full_vs_measured_median": {k: fit(pf, v) for k, v in parts.items()},
        "quick_scale_from_a_few_networks": held,
        "quick_vs_full_mean_abs_pct": round(float(agree.mean()), 2),
        "quick_vs_full_max_abs_pct": round(float(agree.max()), 2),
        "quick_over_full_mean": round(float(np.mean(pq / pf)), 4),
        "measured_median_ms_range": {k: [round(float(med[v].min()), 3), round(float(med[v].max()), 3)]
                                     for k, v in parts.items()},
        "reference_network_ms": drift,
        "targets": {"stratified_spearman_mape": met["stratified"], "uniform_spearman_mape": met["uniform"],
                    "quick_profile_le_90s": bool(quick_s <= 90), "quick_vs_full_le_10pct": bool(agree.max() <= 10.0)},
        "networks": [{"set": "uniform" if i < n else "stratified", "quick_ms": round(float(a), 3),
                      "full_ms": round(float(b), 3), "median_ms": round(float(c), 3)}
                     for i, (a, b, c) in enumerate(zip(pq, pf, med))],
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
    parser.add_argument("--n-local", type=int, default=20, help="networks per set (uniform, stratified), local check")
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
    # the full mode: twice the quick mode's time per cover network, in more rounds
    full_local = ProfilerSettings(threads=lt, warmup=10, repeats=100, min_time_s=12.0, rounds=20, max_repeats=10000,
                                  statistic="median", clock=lclock)
    measure_local = ProfilerSettings(threads=lt, warmup=5, repeats=40, min_time_s=1.5, rounds=20, statistic="median",
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
    result["targets_met"].update({f"local_{k}": v for k, v in result["local"]["targets"].items()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
