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
from proxyless_ray.latency.profiler import check_device, robust_stats
from proxyless_ray.nn.arch import Arch


def measure_network(arch: Arch, device: str = "cpu", threads: int = 1, batch_size: int = 1,
                    statistic: str = "median", min_time_s: float = 1.0, repeats: int = 30,
                    warmup: int = 5, clock: str = "wall", net: Any = None) -> dict[str, Any]:
    """End-to-end forward latency of ``arch`` (``net`` when given, else random weights; eval mode) on this machine.

    The allocator is tuned and the thread count pinned as when profiles are measured; on CUDA the stream is
    synchronised after every run. ``ms`` is ``statistic`` of the runs (:func:`robust_stats`) on ``clock``
    (``wall``, or ``thread``: this thread's CPU time, 1 CPU thread only), so it compares with a profile measured
    the same way.

    Returns:
        ``{"ms", "spread_ms", "count", "statistic", "threads", "batch_size", "device"}``.
    """
    import torch

    from proxyless_ray.nn.network import ProxylessNet
    from proxyless_ray.runtime import tune_allocator

    check_device(device)
    if clock == "thread" and (device != "cpu" or threads != 1):
        raise ValueError(f"clock 'thread' needs device 'cpu' and 1 thread, got {device!r} and {threads}")
    now = time.thread_time if clock == "thread" else time.perf_counter
    tune_allocator()
    dev = torch.device(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = (net if net is not None else ProxylessNet(arch.without_zeros())).to(dev).eval()
        x = torch.randn(batch_size, arch.in_chs, arch.resolution, arch.resolution, device=dev)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        samples: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            sync()
            t_end = time.perf_counter() + min_time_s
            while len(samples) < repeats or time.perf_counter() < t_end:
                t0 = now()
                net(x)
                sync()
                samples.append((now() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    ms, spread = robust_stats(samples, statistic)
    return {"ms": ms, "spread_ms": spread, "count": len(samples), "statistic": statistic, "clock": clock,
            "threads": threads, "batch_size": batch_size, "device": device}


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
                  names: Sequence[str] | None = None) -> list[CheckRow]:
    """Predict and measure every network of ``archs`` with ``profile``'s device, threads, batch, statistic and
    clock."""
    md = profile.metadata
    device = profile_device(profile)
    stat = str(md.get("statistic") or "median")
    clock = str(md.get("clock") or "wall")
    rows = []
    for i, arch in enumerate(archs):
        predicted = arch_latency(profile, arch)[0]
        m = measure_network(arch, device, int(md["threads"]), int(md["batch_size"]), stat, min_time_s, repeats,
                            clock=clock)
        label = (names[i] if names else None) or arch.name or f"arch{i}"
        rows.append(CheckRow(label, predicted, m["ms"], m["spread_ms"], m["count"]))
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


__all__ = ["CheckRow", "ScaleFit", "calibrated", "check_profile", "fit_scale", "measure_network", "profile_device"]
