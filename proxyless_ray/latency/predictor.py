"""Latency predictors for shapes a profile does not hold: per-op-type linear fits and an analytic roofline.

A profile's exact entries come first; these models price everything else (another resolution, width or data set).

* :class:`LinearPredictor` -- per op type (``mb``, ``mb_e1``, ``conv``, ``conv1x1``, ``fc``), latency is a
  non-negative combination of analytic features from :func:`proxyless_ray.latency.flops.layer_cost`:
  pointwise/dense MACs, depthwise MACs, activation and weight bytes moved, and kernel launches. It is fitted by
  non-negative least squares on *relative* residuals (every entry counts alike, whether 0.05 ms or 20 ms), and
  stores its fit error (in-sample and leave-one-out MAPE).
  Non-negative coefficients keep every prediction positive and monotone in layer size.
* :class:`RooflinePredictor` -- an analytic model from datasheet figures for hardware we cannot measure: each
  kernel (conv, BN, activation, residual add) takes max(FLOPs / compute, bytes / bandwidth) plus a launch overhead.

ProxylessNAS (https://arxiv.org/abs/1812.00332) prices candidates from a measured per-layer lookup table; the
predictors here extend such tables to shapes they were not measured at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from proxyless_ray.latency.flops import layer_cost
from proxyless_ray.nn.arch import Arch, out_resolution, parse_block, parse_layer_key

FEATURES = ("pw_mmacs", "dw_mmacs", "act_mbytes", "weight_mbytes", "kernels")
OP_TYPES = ("mb", "mb_e1", "conv", "conv1x1", "fc")
POOLED = "pooled"


def op_type(block: str) -> str:
    """The op type a block is priced as: ``mb``, ``mb_e1`` (MBConv without expansion conv), ``conv`` (a dense
    KxK conv such as the stem), ``conv1x1`` (the pointwise feature mix) or ``fc`` (pooling + classifier)."""
    if block.startswith("fc_c"):
        return "fc"
    spec = parse_block(block)
    if spec.is_zero:
        raise ValueError("the zero op has no latency to predict")
    if spec.kind == "mb" and spec.exp_ratio == 1:
        return "mb_e1"
    if spec.kind == "conv" and spec.kernel_size == 1:
        return "conv1x1"
    return spec.kind


def weight_count(block: str, in_chs: int) -> int:
    """Parameters a layer reads (conv and linear weights; BN is folded or negligible)."""
    if block.startswith("fc_c"):
        n = int(block[4:])
        return in_chs * n + n
    spec = parse_block(block)
    if spec.is_zero:
        return 0
    k2 = spec.kernel_size * spec.kernel_size
    if spec.kind == "conv":
        return in_chs * spec.out_chs * k2
    mid = in_chs * spec.exp_ratio
    return (in_chs * mid if spec.exp_ratio != 1 else 0) + mid * k2 + mid * spec.out_chs


def features(block: str, in_chs: int, resolution: int, dtype_bytes: int = 4) -> np.ndarray:
    """Feature vector (:data:`FEATURES`) of one layer at batch 1.

    Millions of dense/pointwise MACs and of depthwise MACs, megabytes of activations and of weights moved, and
    the number of conv/linear kernels (a fixed per-kernel cost).
    """
    cost = layer_cost(block, in_chs, resolution, dtype_bytes)
    w_bytes = weight_count(block, in_chs) * dtype_bytes
    return np.array([(cost.macs - cost.dw_macs) / 1e6, cost.dw_macs / 1e6, (cost.bytes - w_bytes) / 1e6,
                     w_bytes / 1e6, float(cost.kernels)])


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| s.t. x >= 0 (Lawson & Hanson's active-set method)."""
    n = a.shape[1]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(3 * n + 10):
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(s[passive] > tol):
                break
            neg = passive & (s <= tol)
            step = np.min(x[neg] / np.maximum(x[neg] - s[neg], 1e-300))
            x = x + step * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = s
        w = a.T @ (b - a @ x)
    return x / scale


@dataclass(frozen=True)
class FitStats:
    """How well a fitted model reproduces the entries it was fitted on (all errors on latency in ms)."""

    n: int
    mape: float  # mean absolute percentage error on the fitted entries, %
    rmse_ms: float
    max_ape: float  # worst absolute percentage error, %
    loo_mape: float | None = None  # leave-one-out MAPE, % (held-out error; None when n is too small)


@dataclass(frozen=True)
class LinearPredictor:
    """Per-op-type ``lat_ms = coef . features`` with non-negative coefficients.

    Attributes:
        coefs: Op type (or ``pooled``, the fallback fitted on all entries) -> coefficients over :data:`FEATURES`.
        stats: Op type -> fit error of that model on the entries of that type.
        basis: Op type -> how its coefficients came about (``fit``, ``scaled-pooled`` for a type with too few
            entries for its own fit: the pooled model times one fitted factor).
        dtype_bytes: Bytes per element the byte features assume.
        scale: Factor on every prediction; 1 unless the per-layer sum was calibrated to a published end-to-end
            latency of a whole network (isolated per-layer runs overstate a network's latency on some runtimes).
        calibration: Where ``scale`` comes from (network, published ms, source, uncalibrated prediction).
    """

    coefs: Mapping[str, tuple[float, ...]]
    stats: Mapping[str, FitStats] = field(default_factory=dict)
    basis: Mapping[str, str] = field(default_factory=dict)
    dtype_bytes: int = 4
    scale: float = 1.0
    calibration: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "linear"

    def __post_init__(self) -> None:
        if POOLED not in self.coefs and not all(t in self.coefs for t in OP_TYPES):
            raise ValueError(f"linear predictor needs coefficients for {POOLED!r} or for every op type {OP_TYPES}, "
                             f"got {sorted(self.coefs)}")
        for t, c in self.coefs.items():
            if len(c) != len(FEATURES):
                raise ValueError(f"predictor coefficients for {t!r} have {len(c)} values; expected {len(FEATURES)} "
                                 f"({', '.join(FEATURES)})")
            if any(not math.isfinite(v) or v < 0 for v in c):
                raise ValueError(f"predictor coefficients for {t!r} must be finite and >= 0, got {list(c)}")
            if not any(v > 0 for v in c):
                raise ValueError(f"predictor coefficients for {t!r} are all zero; every layer would cost 0 ms")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"predictor scale must be a positive number, got {self.scale!r}")

    def lat_ms(self, block: str, in_chs: int, resolution: int) -> float:
        """Predicted latency in ms of ``block`` on an ``in_chs x resolution x resolution`` input."""
        coef = self.coefs.get(op_type(block), self.coefs.get(POOLED))
        return self.scale * float(np.dot(coef, features(block, in_chs, resolution, self.dtype_bytes)))

    def to_dict(self) -> dict[str, Any]:
        types = {}
        for t, c in self.coefs.items():
            d: dict[str, Any] = {"coefs": [float(f"{v:.6g}") for v in c], "basis": self.basis.get(t, "fit")}
            if t in self.stats:
                s = self.stats[t]
                d["fit"] = {"n": s.n, "mape_pct": round(s.mape, 2), "rmse_ms": float(f"{s.rmse_ms:.4g}"),
                            "max_ape_pct": round(s.max_ape, 2),
                            "loo_mape_pct": None if s.loo_mape is None else round(s.loo_mape, 2)}
            types[t] = d
        out: dict[str, Any] = {"kind": self.kind, "features": list(FEATURES), "dtype_bytes": self.dtype_bytes,
                               "op_types": types}
        if self.scale != 1.0 or self.calibration:
            out["scale"] = float(f"{self.scale:.6g}")
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<predictor>") -> LinearPredictor:
        unknown = sorted(set(d) - {"kind", "features", "dtype_bytes", "op_types", "scale", "calibration"})
        if unknown:
            raise ValueError(f"{source}: unknown linear predictor field(s) {unknown}")
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError(f"{source}: predictor features {d.get('features')!r} are not {list(FEATURES)}")
        types = d.get("op_types")
        if not isinstance(types, Mapping) or not types:
            raise ValueError(f"{source}: predictor.op_types must be a non-empty mapping, got {types!r}")
        coefs, stats, basis = {}, {}, {}
        for t, td in types.items():
            if t not in (*OP_TYPES, POOLED):
                raise ValueError(f"{source}: unknown predictor op type {t!r}; expected some of {[*OP_TYPES, POOLED]}")
            try:
                coefs[t] = tuple(float(v) for v in td["coefs"])
                basis[t] = str(td.get("basis", "fit"))
                if td.get("fit"):
                    f = td["fit"]
                    stats[t] = FitStats(int(f["n"]), float(f["mape_pct"]), float(f["rmse_ms"]),
                                        float(f["max_ape_pct"]),
                                        None if f.get("loo_mape_pct") is None else float(f["loo_mape_pct"]))
            except (AttributeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{source}: predictor.op_types.{t} must hold 'coefs' (numbers) and optionally "
                                 f"'basis' and 'fit' {{n, mape_pct, rmse_ms, max_ape_pct, loo_mape_pct}}; "
                                 f"got {td!r}") from None
        try:
            return cls(coefs, stats, basis, int(d.get("dtype_bytes", 4)), d.get("scale", 1.0),
                       dict(d.get("calibration") or {}))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def _stats(pred: np.ndarray, y: np.ndarray, loo: np.ndarray | None = None) -> FitStats:
    ape = np.abs(pred - y) / y * 100
    loo_mape = None if loo is None else float(np.mean(np.abs(loo - y) / y * 100))
    return FitStats(len(y), float(ape.mean()), float(np.sqrt(np.mean((pred - y) ** 2))), float(ape.max()), loo_mape)


def _fit_relative(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, FitStats]:
    """NNLS on relative residuals (rows divided by the target) plus leave-one-out error."""
    a, b = x / y[:, None], np.ones(len(y))
    coef = nnls(a, b)
    loo = None
    if len(y) > 2 * x.shape[1]:
        loo = np.array([x[i] @ nnls(np.delete(a, i, 0), np.delete(b, i)) for i in range(len(y))])
    return coef, _stats(x @ coef, y, loo)


def fit_linear(entries: Mapping[str, float], dtype_bytes: int = 4, min_per_type: int | None = None) -> LinearPredictor:
    """Fit a :class:`LinearPredictor` on ``{layer_key: lat_ms}``.

    Each op type with at least ``min_per_type`` entries (default: twice the number of features) gets its own fit;
    a type with fewer entries gets the pooled model times one factor fitted on its entries (geometric mean of the
    ratios); a type with none falls back to the pooled model.

    Raises:
        ValueError: with no entries, or a key that does not parse, or a latency that is not a positive number.
    """

    if not entries:
        raise ValueError("cannot fit a latency predictor on an empty profile")
    min_per_type = 2 * len(FEATURES) if min_per_type is None else min_per_type
    rows: dict[str, list[tuple[np.ndarray, float]]] = {t: [] for t in OP_TYPES}
    for key, ms in entries.items():
        if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
            raise ValueError(f"entry {key!r} has latency {ms!r}; expected a positive number of ms")
        block, in_chs, res = parse_layer_key(key)
        rows[op_type(block)].append((features(block, in_chs, res, dtype_bytes), float(ms)))
    all_x = np.array([r[0] for t in OP_TYPES for r in rows[t]])
    all_y = np.array([r[1] for t in OP_TYPES for r in rows[t]])
    pooled, pooled_stats = _fit_relative(all_x, all_y)
    if not np.any(pooled > 0):
        raise ValueError("latency fit produced all-zero coefficients; entries carry no signal")
    coefs: dict[str, tuple[float, ...]] = {POOLED: tuple(pooled)}
    stats: dict[str, FitStats] = {POOLED: pooled_stats}
    basis: dict[str, str] = {POOLED: "fit"}
    for t in OP_TYPES:
        if not rows[t]:
            continue
        x = np.array([r[0] for r in rows[t]])
        y = np.array([r[1] for r in rows[t]])
        coef = None
        if len(y) >= min_per_type:
            coef, st = _fit_relative(x, y)
            basis[t] = "fit"
        if coef is None or not np.any(coef > 0):
            factor = float(np.exp(np.mean(np.log(y / np.maximum(x @ pooled, 1e-12)))))
            coef, basis[t] = pooled * factor, "scaled-pooled"
            st = _stats(x @ coef, y)
        coefs[t], stats[t] = tuple(coef), st
    return LinearPredictor(coefs, stats, basis, dtype_bytes)


def calibrate(predictor: LinearPredictor, arch: Arch, published_ms: float, reference: str) -> LinearPredictor:
    """Scale ``predictor`` so that its per-layer sum for ``arch`` equals a published end-to-end latency.

    Use a network other than the ones you validate on (the pixel1 profile calibrates on MobileNetV2 and is
    checked on ProxylessNAS-Mobile).
    """
    if not (math.isfinite(published_ms) and published_ms > 0):
        raise ValueError(f"published latency must be a positive number of ms, got {published_ms!r}")
    base = replace(predictor, scale=1.0)
    raw = sum(base.lat_ms(lay.block, lay.in_chs, lay.resolution) for lay in arch.layers() if lay.block != "zero")
    info = {"network": arch.name or "unnamed", "published_ms": published_ms, "uncalibrated_ms": round(raw, 3),
            "reference": reference}
    return replace(predictor, scale=published_ms / raw, calibration=info)


@dataclass(frozen=True)
class RooflinePredictor:
    """Analytic per-kernel roofline: ``sum_k max(flops_k / compute, bytes_k / bandwidth) + launches * overhead``.

    Every MBConv runs as eager-mode kernels: each conv, then a BN and an activation kernel (BN is not folded in
    eager inference), and a residual add. Activations scale with the batch, weights do not.

    Attributes:
        peak_tflops: Datasheet peak throughput for the dtype.
        compute_efficiency: Fraction of peak a conv kernel reaches (an assumption; see the profile's sources).
        bandwidth_gbs: Sustained memory bandwidth in GB/s.
        launch_us: Fixed cost per kernel launch in microseconds.
        batch_size: Images per forward pass.
        dtype_bytes: Bytes per element.
        sources: Constant name -> where its value comes from (datasheet, paper, or "assumption: ...").
    """

    peak_tflops: float
    compute_efficiency: float
    bandwidth_gbs: float
    launch_us: float
    batch_size: int = 1
    dtype_bytes: int = 4
    sources: Mapping[str, str] = field(default_factory=dict)  # constant name -> where the number comes from
    kind: str = "roofline"

    def __post_init__(self) -> None:
        for name in ("peak_tflops", "bandwidth_gbs", "launch_us", "batch_size", "dtype_bytes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"roofline {name} must be a positive number, got {v!r}")
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError(f"roofline compute_efficiency must be in (0, 1], got {self.compute_efficiency!r}")

    def kernels(self, block: str, in_chs: int, resolution: int) -> list[tuple[float, float]]:
        """``(flops, bytes)`` of every kernel the layer launches at this predictor's batch size."""
        bsz, eb = self.batch_size, self.dtype_bytes
        if block.startswith("fc_c"):
            n, hw = int(block[4:]), resolution * resolution
            pool = (in_chs * hw * bsz, (in_chs * hw + in_chs) * bsz * eb)
            return [pool, (2 * in_chs * n * bsz, (in_chs * n + n + (in_chs + n) * bsz) * eb)]
        spec = parse_block(block)
        if spec.is_zero:
            return []
        hw_in, res_out = resolution * resolution, out_resolution(resolution, spec.stride)
        hw_out = res_out * res_out

        def conv(cin: int, cout: int, k: int, hw_i: int, hw_o: int, groups: int = 1) -> list[tuple[float, float]]:
            macs = cout * (cin // groups) * k * k * hw_o * bsz
            byt = ((cin * hw_i + cout * hw_o) * bsz + cout * (cin // groups) * k * k) * eb
            elementwise = (2 * cout * hw_o * bsz, 2 * cout * hw_o * bsz * eb)  # BN or activation: read + write
            return [(2 * macs, byt), elementwise, elementwise]

        if spec.kind == "conv":
            return conv(in_chs, spec.out_chs, spec.kernel_size, hw_in, hw_out)
        mid = in_chs * spec.exp_ratio
        out: list[tuple[float, float]] = []
        if spec.exp_ratio != 1:
            out += conv(in_chs, mid, 1, hw_in, hw_in)
        out += conv(mid, mid, spec.kernel_size, hw_in, hw_out, groups=mid)
        out += conv(mid, spec.out_chs, 1, hw_out, hw_out)[:2]  # linear projection: conv + BN, no activation
        if spec.stride == 1 and in_chs == spec.out_chs:
            out.append((spec.out_chs * hw_out * bsz, 3 * spec.out_chs * hw_out * bsz * eb))
        return out

    def lat_ms(self, block: str, in_chs: int, resolution: int) -> float:
        """Predicted latency in ms of one layer at this predictor's batch size."""
        compute = self.peak_tflops * 1e12 * self.compute_efficiency
        bandwidth = self.bandwidth_gbs * 1e9
        ks = self.kernels(block, in_chs, resolution)
        return sum(max(f / compute, b / bandwidth) for f, b in ks) * 1e3 + len(ks) * self.launch_us * 1e-3

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "peak_tflops": self.peak_tflops, "compute_efficiency": self.compute_efficiency,
                "bandwidth_gbs": self.bandwidth_gbs, "launch_us": self.launch_us, "batch_size": self.batch_size,
                "dtype_bytes": self.dtype_bytes, "sources": dict(self.sources)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<predictor>") -> RooflinePredictor:
        names = ("peak_tflops", "compute_efficiency", "bandwidth_gbs", "launch_us", "batch_size", "dtype_bytes",
                 "sources")
        missing = [n for n in names[:4] if n not in d]
        if missing:
            raise ValueError(f"{source}: roofline predictor lacks {missing}")
        unknown = sorted(set(d) - {*names, "kind"})
        if unknown:
            raise ValueError(f"{source}: unknown roofline predictor field(s) {unknown}; expected some of {list(names)}")
        try:
            return cls(**{n: d[n] for n in names if n in d})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


Predictor = LinearPredictor | RooflinePredictor


def predictor_from_dict(d: Any, source: str = "<predictor>") -> Predictor:
    """Rebuild a predictor from its ``to_dict`` form, dispatching on ``kind`` (``linear`` or ``roofline``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: predictor must be a mapping, got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "linear":
        return LinearPredictor.from_dict(d, source)
    if kind == "roofline":
        return RooflinePredictor.from_dict(d, source)
    raise ValueError(f"{source}: unknown predictor kind {kind!r}; expected 'linear' or 'roofline'")
