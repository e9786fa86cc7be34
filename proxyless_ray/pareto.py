"""Pareto fronts of latency-accuracy sweeps: non-dominated sorting, 2-D hypervolume and per-hardware tables.

Pure numpy/pandas (no Ray), shared by the Pareto-aware scheduler (``proxyless_ray.sweeps.schedulers``), the sweep report
and the benchmarks. Conventions used throughout:

* a point is a row of ``points`` with shape ``(n, d)``; ``senses`` says per column whether larger (``"max"``) or
  smaller (``"min"``) is better. The sweep's objectives are ``(heldout_acc, expected_latency_ms)`` with
  senses ``("max", "min")``;
* ``a`` dominates ``b`` when ``a`` is no worse in every objective and strictly better in at least one. Identical
  points therefore never dominate each other: they share a rank and are all on the front together;
* a NaN objective counts as the worst possible value (a diverged trial is dominated by every finite one);
* ranks are 0-based: rank 0 is the non-dominated front, rank 1 the front once rank 0 is removed, and so on
  (the fast non-dominated sort of NSGA-II: Deb, Pratap, Agarwal, Meyarivan, IEEE TEC 2002).

Hypervolume (2-D, accuracy up, latency down) is the area of the region dominated by the front and bounded by a
reference point ``(acc_ref, lat_ref)``: the union over points of ``[acc_ref, acc] x [lat, lat_ref]``, in units of
accuracy x ms. Points no better than the reference in both objectives add nothing. Hypervolumes are comparable only
under the same reference point, so compare two sweeps on one hardware with :func:`shared_references`; its default is
``acc_ref = 0`` and ``lat_ref = 1.1 x`` the largest latency seen on that hardware.

Multi-objective ASHA, which ranks trials at each rung by these non-dominated ranks: Schmucker, Donini, Zafar, Salinas,
Archambeau, "Multi-objective Asynchronous Successive Halving", https://arxiv.org/abs/2106.12639
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ACC_LAT_SENSES: tuple[str, str] = ("max", "min")
TABLE_COLUMNS: tuple[str, ...] = ("hardware", "trial_id", "lambda", "beta", "target_ms", "heldout_acc",
                                  "expected_latency_ms", "arch", "rank", "on_front")
_PARAM_COLUMNS: tuple[str, ...] = ("lambda", "beta", "target_ms", "arch")


def _as_minimisation(points: Any, senses: Sequence[str]) -> np.ndarray:
    """Return a float copy of ``points`` where smaller is better in every column and NaN is +inf (the worst)."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim == 1 and pts.size == 0:
        pts = pts.reshape(0, len(senses))
    if pts.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got shape {pts.shape}")
    if len(senses) != pts.shape[1]:
        raise ValueError(f"need one sense per objective: {pts.shape[1]} objectives, senses={tuple(senses)}")
    signs = []
    for sense in senses:
        if sense not in ("max", "min"):
            raise ValueError(f"each sense must be 'max' or 'min', got {sense!r}")
        signs.append(-1.0 if sense == "max" else 1.0)
    pts = pts * np.asarray(signs)
    pts[np.isnan(pts)] = np.inf
    return pts


def non_dominated_ranks(points: Any, senses: Sequence[str] = ACC_LAT_SENSES) -> np.ndarray:
    """Non-dominated rank of every point (0 = Pareto front), by fast non-dominated sorting.

    Args:
        points: Array-like of shape ``(n, d)``.
        senses: ``"max"`` or ``"min"`` per column; default ``("max", "min")`` for (accuracy, latency).

    Returns:
        Integer array of shape ``(n,)``. Identical points get the same rank.
    """
    pts = _as_minimisation(points, senses)
    n = len(pts)
    ranks = np.full(n, -1, dtype=int)
    if n == 0:
        return ranks
    # dominates[i, j]: i is no worse than j everywhere and strictly better somewhere.
    no_worse = np.all(pts[:, None, :] <= pts[None, :, :], axis=2)
    better = np.any(pts[:, None, :] < pts[None, :, :], axis=2)
    dominates = no_worse & better
    dominated_by = dominates.sum(axis=0)
    current = np.flatnonzero(dominated_by == 0)
    rank = 0
    while current.size:
        ranks[current] = rank
        # Peel the current front off: whoever drops to zero dominators forms the next one.
        dominated_by -= dominates[current].sum(axis=0)
        dominated_by[current] = -1
        current = np.flatnonzero(dominated_by == 0)
        rank += 1
    return ranks


def pareto_front_mask(points: Any, senses: Sequence[str] = ACC_LAT_SENSES) -> np.ndarray:
    """Boolean mask of the non-dominated points (rank 0); see :func:`non_dominated_ranks`."""
    return non_dominated_ranks(points, senses) == 0


def hypervolume_2d(points: Any, reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` in (accuracy up, latency down), bounded by ``reference``.

    Args:
        points: Array-like of shape ``(n, 2)`` with columns ``(acc, lat_ms)``; dominated points may be included.
        reference: ``(acc_ref, lat_ref)``, a point worse than every interesting one (e.g. ``(0, 1.1 * max lat)``).

    Returns:
        The hypervolume in accuracy x ms; 0.0 when no point is strictly better than the reference in both.
    """
    pts = _as_minimisation(points, ACC_LAT_SENSES)
    ref = _as_minimisation([reference], ACC_LAT_SENSES)[0]
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference point must be finite, got {reference}")
    pts = pts[np.all(pts < ref, axis=1)]
    # Best accuracy first (ties: lower latency first); each point adds the strip of latency it improves.
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    volume, best_lat = 0.0, ref[1]
    for neg_acc, lat in pts[order]:
        if lat < best_lat:
            volume += (ref[0] - neg_acc) * (best_lat - lat)
            best_lat = lat
    return float(volume)


def scalarised_score(acc: float, lat_ms: float, weight: float) -> float:
    """``acc - weight * ln(lat_ms)``: the single ``score`` metric that the ASHA baseline ranks on."""
    if lat_ms <= 0:
        raise ValueError(f"latency must be > 0 ms, got {lat_ms}")
    return float(acc) - weight * math.log(lat_ms)


def _lookup(result: Mapping[str, Any], key: str) -> Any:
    """``result[key]``, else the trial config's (``result["config"][key]`` or the flattened ``config/<key>``)."""
    if key in result:
        return result[key]
    config = result.get("config")
    if isinstance(config, Mapping) and key in config:
        return config[key]
    return result.get(f"config/{key}")


def pareto_table(results: Iterable[Mapping[str, Any]], hardware_key: str = "hardware",
                 acc_key: str = "heldout_acc", lat_key: str = "expected_latency_ms") -> pd.DataFrame:
    """One row per trial with its non-dominated rank among the trials of the same hardware.

    Args:
        results: Trial result dicts (e.g. ``Result.metrics`` or the rows of ``ResultGrid.get_dataframe()``). Each
            value is read from the dict itself, else from its ``config`` (nested, or flattened as ``config/<key>``).
        hardware_key: Key of the hardware profile name.
        acc_key: Key of the held-out accuracy (higher is better).
        lat_key: Key of the expected latency in ms (lower is better).

    Returns:
        A DataFrame with columns :data:`TABLE_COLUMNS` sorted by hardware, rank and latency. ``lambda``, ``beta``,
        ``target_ms`` and ``arch`` are missing (NaN/None) where a trial has no such value. Trials without both
        metrics (e.g. they failed before their first report) are left out with a warning.
    """
    rows, skipped = [], 0
    for i, res in enumerate(results):
        hardware = _lookup(res, hardware_key)
        if hardware is None:
            raise ValueError(f"result {i} has no {hardware_key!r} (looked in the result and its config)")
        acc, lat = _lookup(res, acc_key), _lookup(res, lat_key)
        if acc is None or lat is None:
            skipped += 1
            continue
        row = {"hardware": str(hardware), "trial_id": _lookup(res, "trial_id"),
               "heldout_acc": float(acc), "expected_latency_ms": float(lat)}
        row.update({col: _lookup(res, col) for col in _PARAM_COLUMNS})
        rows.append(row)
    if skipped:
        logger.warning("pareto_table: left out %d result(s) without %r and %r", skipped, acc_key, lat_key)
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c not in ("rank", "on_front")])
    table["rank"] = pd.Series(dtype=int)
    for _, idx in table.groupby("hardware").groups.items():
        points = table.loc[idx, ["heldout_acc", "expected_latency_ms"]].to_numpy()
        table.loc[idx, "rank"] = non_dominated_ranks(points, ACC_LAT_SENSES)
    table["rank"] = table["rank"].astype(int)
    table["on_front"] = table["rank"] == 0
    table = table.sort_values(["hardware", "rank", "expected_latency_ms", "heldout_acc"],
                              ascending=[True, True, True, False], kind="stable")
    return table.reset_index(drop=True)


def _hardware_rows(table: pd.DataFrame, hardware: str) -> pd.DataFrame:
    rows = table[table["hardware"] == hardware]
    if rows.empty:
        known = sorted(table["hardware"].unique())
        raise ValueError(f"no trials for hardware {hardware!r}; the table has {known}")
    return rows


def best_within_target(table: pd.DataFrame, hardware: str, target_ms: float) -> dict[str, Any] | None:
    """The most accurate front member of ``hardware`` whose latency is at most ``target_ms``.

    Args:
        table: A table from :func:`pareto_table`.
        hardware: Hardware profile name; must appear in the table.
        target_ms: Latency budget in ms (inclusive).

    Returns:
        The row as a dict (equal accuracy: the lower latency, then the smaller trial id), or None when no front member
        meets the budget.
    """
    rows = _hardware_rows(table, hardware)
    rows = rows[rows["on_front"] & (rows["expected_latency_ms"] <= target_ms)]
    if rows.empty:
        return None
    rows = rows.assign(_tid=rows["trial_id"].astype(str))
    best = rows.sort_values(["heldout_acc", "expected_latency_ms", "_tid"], ascending=[False, True, True]).iloc[0]
    return best.drop("_tid").to_dict()


def shared_references(*tables: pd.DataFrame, acc_ref: float = 0.0,
                      lat_margin: float = 1.1) -> dict[str, tuple[float, float]]:
    """One reference point per hardware, taken over the union of ``tables`` so their hypervolumes compare.

    Args:
        *tables: Tables from :func:`pareto_table` (e.g. one per scheduler).
        acc_ref: Reference accuracy (default 0, the worst possible).
        lat_margin: Reference latency as a multiple of the largest latency seen on that hardware (> 1 so that the
            slowest front member still adds area).

    Returns:
        ``{hardware: (acc_ref, lat_ref)}``.
    """
    if lat_margin <= 1.0:
        raise ValueError(f"lat_margin must be > 1, got {lat_margin}")
    both = pd.concat([t[["hardware", "expected_latency_ms"]] for t in tables], ignore_index=True)
    max_lat = both.groupby("hardware")["expected_latency_ms"].max()
    return {str(hw): (float(acc_ref), float(lat) * lat_margin) for hw, lat in max_lat.items()}


def hypervolume_by_hardware(table: pd.DataFrame,
                            references: Mapping[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Hypervolume of each hardware's front.

    Args:
        table: A table from :func:`pareto_table`.
        references: ``{hardware: (acc_ref, lat_ref)}``; default :func:`shared_references` of this table alone.
            Pass the same references when comparing sweeps.

    Returns:
        A DataFrame with columns ``hardware, hypervolume, acc_ref, lat_ref, n_front, n_trials``.
    """
    references = shared_references(table) if references is None else references
    out = []
    for hardware, rows in table.groupby("hardware"):
        if hardware not in references:
            raise ValueError(f"no reference point for hardware {hardware!r}; have {sorted(references)}")
        ref = references[hardware]
        points = rows[["heldout_acc", "expected_latency_ms"]].to_numpy()
        out.append({"hardware": hardware, "hypervolume": hypervolume_2d(points, ref), "acc_ref": ref[0],
                    "lat_ref": ref[1], "n_front": int(rows["on_front"].sum()), "n_trials": len(rows)})
    return pd.DataFrame(out, columns=["hardware", "hypervolume", "acc_ref", "lat_ref", "n_front", "n_trials"])
