"""Checking a profile against whole networks measured here, and calibrating it with one scale.

A profile prices a network as the sum of its layers. :func:`measure_network` times the network end to end the way
the profile's entries were timed (same device, threads, batch size and statistic, the tuned allocator), so
:func:`check_profile` shows how far the prediction is from this machine. :func:`fit_scale` fits one factor over
a few networks (least squares on relative errors) and states its error; :func:`calibrated` applies it to every
entry and to the predictor, so a profile from a similar machine can be adjusted with a few end-to-end runs.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxyless_ray.latency.fingerprint import machine_fingerprint
from proxyless_ray.latency.model import arch_latency
from proxyless_ray.latency.predictor import LinearPredictor, RooflinePredictor
from proxyless_ray.latency.profile import Entry, Profile
from proxyless_ray.latency.timing import check_device, robust_stats
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.runtime import tune_allocator

# End-to-end checks split each network's timing into this many windows, interleaved across the networks
CHECK_ROUNDS = 10


def measure_network(arch: Arch, device: str = "cpu", threads: int = 1, batch_size: int = 1,
                    statistic: str = "median", min_time_s: float = 1.0, repeats: int = 30,
                    warmup: int = 5, clock: str = "wall", net: Any = None, rounds: int = 1) -> dict[str, Any]:
    """End-to-end forward latency of ``arch`` (``net`` when given, else random weights; eval mode) on this machine:
    :func:`measure_networks` of one network."""
    return measure_networks([arch], device, threads, batch_size, statistic, min_time_s, repeats, warmup, clock,
                            None if net is None else [net], rounds)[0]


def measure_networks(archs: Sequence[Arch], device: str = "cpu", threads: int = 1, batch_size: int = 1,
                     statistic: str = "median", min_time_s: float = 1.0, repeats: int = 30, warmup: int = 5,
                     clock: str = "wall", nets: Sequence[Any] | None = None, rounds: int = 1) -> list[dict[str, Any]]:
    """End-to-end forward latency of each network (``nets`` when given, else random weights; eval mode) here.

    The allocator is tuned and the thread count pinned as when profiles are measured; on CUDA the stream is
    synchronised after every run. Each network gets ``min_time_s`` seconds and ``repeats`` runs at least, split
    into ``rounds`` short windows that visit the networks in a new order each round: a machine whose speed
    drifts (other processes, a busy neighbour on the host) then slows every network alike instead of the few
    timed during a slow spell. ``ms`` is ``statistic`` of all runs (:func:`robust_stats`) on ``clock`` (``wall``,
    or ``thread``: this thread's CPU time, 1 CPU thread only), so it compares with a profile measured the same way.

    Returns:
        Per network ``{"ms", "median_ms", "spread_ms", "count", "statistic", "clock", "threads", "batch_size",
        "device", "rounds"}``.
    """
    import random

    import torch


    check_device(device)
    if clock == "thread" and (device != "cpu" or threads != 1):
        raise ValueError(f"clock 'thread' needs device 'cpu' and 1 thread, got {device!r} and {threads}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if nets is not None and len(nets) != len(archs):
        raise ValueError(f"got {len(nets)} networks for {len(archs)} architectures")
    now = time.thread_time if clock == "thread" else time.perf_counter
    tune_allocator()
    dev = torch.device(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    share_n, share_s = -(-repeats // rounds), min_time_s / rounds
    samples: list[list[float]] = [[] for _ in archs]
    try:
        nets = [(n if n is not None else ProxylessNet(a.without_zeros())).to(dev).eval()
                for a, n in zip(archs, nets or [None] * len(archs))]
        xs = [torch.randn(batch_size, a.in_chs, a.resolution, a.resolution, device=dev) for a in archs]
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        order, shuffle = list(range(len(archs))), random.Random(0)
        with torch.inference_mode():
            for r in range(rounds):
                for i in order:
                    net, x = nets[i], xs[i]
                    for _ in range(warmup if r == 0 else min(warmup, 2)):
                        net(x)
                    sync()
                    n, t_end = 0, time.perf_counter() + share_s
                    while n < share_n or time.perf_counter() < t_end:
                        t0 = now()
                        net(x)
                        sync()
                        samples[i].append((now() - t0) * 1e3)
                        n += 1
                shuffle.shuffle(order)
    finally:
        torch.set_num_threads(old)
    out = []
    for s in samples:
        ms, spread = robust_stats(s, statistic)
        out.append({"ms": ms, "median_ms": robust_stats(s)[0], "spread_ms": spread, "count": len(s),
                    "statistic": statistic, "clock": clock, "threads": threads, "batch_size": batch_size,
                    "device": device, "rounds": rounds})
    return out


def profile_device(profile: Profile) -> str:
    """The torch device a profile's networks are measured on here.

    Raises:
        ValueError: for a mobile profile (nothing here runs its runtime) or a GPU profile without CUDA here.
    """
    kind = profile.metadata.get("device")
    if kind == "cpu":
        return "cpu"
    if kind == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"profile {profile.name!r} is a GPU profile but torch.cuda.is_available() is False "
                             f"here; check it on a GPU machine")
        return "cuda"
    raise ValueError(f"profile {profile.name!r} is for a {kind} device ({profile.metadata.get('device_name')}); "
                     f"--check measures networks on this machine's CPU or GPU, which is not that device")


@dataclass(frozen=True)
class CheckRow:
    """One network: predicted by the profile, measured here."""

    arch: str
    predicted_ms: float
    measured_ms: float
    spread_ms: float
    count: int

    @property
    def ratio(self) -> float:
        """Predicted / measured (1 is exact; 2 means the profile says twice the time it takes here)."""
        return self.predicted_ms / self.measured_ms


def check_profile(profile: Profile, archs: Sequence[Arch], min_time_s: float = 1.0, repeats: int = 30,
                  names: Sequence[str] | None = None, rounds: int = CHECK_ROUNDS) -> list[CheckRow]:
    """Predict and measure every network of ``archs`` with ``profile``'s device, threads, batch, statistic and
    clock; the networks are timed together in ``rounds`` interleaved windows (:func:`measure_networks`)."""
    md = profile.metadata
    device = profile_device(profile)
    stat = str(md.get("statistic") or "median")
    clock = str(md.get("clock") or "wall")
    measured = measure_networks(archs, device, int(md["threads"]), int(md["batch_size"]), stat, min_time_s, repeats,
                                clock=clock, rounds=rounds)
    rows = []
    for i, (arch, m) in enumerate(zip(archs, measured)):
        label = (names[i] if names else None) or arch.name or f"arch{i}"
        rows.append(CheckRow(label, arch_latency(profile, arch)[0], m["ms"], m["spread_ms"], m["count"]))
    return rows


@dataclass(frozen=True)
class ScaleFit:
    """One factor on a profile's predictions, fitted on networks measured here."""

    scale: float
    mape_before: float  # % error of the uncalibrated predictions
    mape_after: float  # % error of the calibrated predictions on the same networks (in-sample)
    loo_mape: float | None  # leave-one-out % error (a network the scale did not see); None below 3 networks
    n: int


def _scale(pred: Sequence[float], meas: Sequence[float]) -> float:
    """Least squares on relative errors: min sum (s p / m - 1)^2 -> s = sum(p/m) / sum((p/m)^2)."""
    r = [p / m for p, m in zip(pred, meas)]
    return sum(r) / sum(x * x for x in r)


def _mape(pred: Sequence[float], meas: Sequence[float]) -> float:
    return statistics.fmean(abs(p - m) / m * 100 for p, m in zip(pred, meas))


def fit_scale(rows: Sequence[CheckRow]) -> ScaleFit:
    """Fit the scale that best turns predictions into measurements, with its in-sample and held-out error.

    Raises:
        ValueError: without rows, or with a non-positive latency.
    """
    if not rows:
        raise ValueError("calibration needs at least one measured network")
    pred = [r.predicted_ms for r in rows]
    meas = [r.measured_ms for r in rows]
    if any(not (math.isfinite(v) and v > 0) for v in pred + meas):
        raise ValueError(f"calibration needs positive latencies, got predicted {pred} and measured {meas}")
    s = _scale(pred, meas)
    loo = None
    if len(rows) >= 3:
        held = [_scale(pred[:i] + pred[i + 1:], meas[:i] + meas[i + 1:]) * pred[i] for i in range(len(rows))]
        loo = _mape(held, meas)
    return ScaleFit(s, _mape(pred, meas), _mape([s * p for p in pred], meas), loo, len(rows))


def calibrated(profile: Profile, fit: ScaleFit, rows: Sequence[CheckRow], name: str) -> Profile:
    """``profile`` with every entry and its predictor multiplied by ``fit.scale``; the metadata records the fit.

    A measured profile then describes this machine: its fingerprint becomes this machine's (the original one is
    kept under ``calibration``).
    """
    s = fit.scale
    entries = {k: Entry(e.ms * s, e.spread * s, e.count) for k, e in profile.entries.items()}
    pred = profile.predictor
    if isinstance(pred, LinearPredictor):
        pred = replace(pred, scale=pred.scale * s)
    elif isinstance(pred, RooflinePredictor):  # max(f / c, b / w) and the launch term all scale by s
        pred = replace(pred, peak_tflops=pred.peak_tflops / s, bandwidth_gbs=pred.bandwidth_gbs / s,
                       launch_us=pred.launch_us * s)
    md = dict(profile.metadata)
    device = "cuda" if md.get("device") == "gpu" else "cpu"
    here = machine_fingerprint(device, int(md.get("threads") or 1)) if md.get("device") != "mobile" else None
    md["calibration"] = {
        "from_profile": profile.name, "scale": round(s, 5), "networks": [r.arch for r in rows],
        "measured_ms": [round(r.measured_ms, 4) for r in rows], "mape_before_pct": round(fit.mape_before, 2),
        "mape_after_pct": round(fit.mape_after, 2),
        "loo_mape_pct": None if fit.loo_mape is None else round(fit.loo_mape, 2),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "original_fingerprint": md.get("fingerprint"),
    }
    if here is not None:
        md["fingerprint"] = here
    md["source"] = f"{md.get('source', '')} Calibrated x{s:.4g} to {len(rows)} network(s) measured end to end."
    return Profile(name, md, entries, pred, profile.strict)


__all__ = ["CHECK_ROUNDS", "CheckRow", "ScaleFit", "calibrated", "check_profile", "fit_scale", "measure_network",
           "measure_networks", "profile_device"]
