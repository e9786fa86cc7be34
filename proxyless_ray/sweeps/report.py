"""The sweep's report: Pareto front per hardware, best network per latency target, compute spent, outputs.

Writes ``pareto.parquet``, ``pareto.csv``, ``pareto.png`` and ``summary.json`` into the sweep folder and prints the
table. Only trials that ran to the end are front candidates; trials a scheduler stopped are listed as ``stopped``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import pandas as pd

from proxyless_ray.config import Experiment
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.pareto import best_within_target, hypervolume_by_hardware, pareto_table
from proxyless_ray.plots import plot_pareto
from proxyless_ray.sweeps.plan import TRIALS_DIR, TrialSpec


def written_metrics(out_dir: str) -> dict[str, Any] | None:
    """The final epoch's metrics of a trial that finished and wrote its outputs (``result.json`` comes last), else
    ``None``."""
    try:
        if not os.path.isfile(os.path.join(out_dir, "result.json")):
            return None
        with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
            lines = fh.read().splitlines()
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return last if last and last.get("finished") else None


def trial_rows(exp: Experiment, grid, sweep_dir: str) -> list[dict[str, Any]]:
    """One row per trial from Tune's ``ResultGrid``: its spec and its last reported metrics.

    A sweep killed just after a trial wrote its outputs, before Tune saved that trial's last result, resumes with
    Tune holding an earlier epoch; the trial's own final metrics (``metrics.jsonl``) then take its place.
    """
    rows = []
    for result in grid:
        key = result.config["trial"]["key"]  # as Tune knows the trial (a sweep restored from an older release too)
        spec = TrialSpec.from_dict(result.config["trial"])
        m = result.metrics or {}
        out_dir = os.path.join(sweep_dir, TRIALS_DIR, key)
        written = written_metrics(out_dir)
        if written and written.get("epoch", 0) > m.get("epoch", 0):
            m = written
        row = {"trial_id": key, "hardware": spec.hardware, "loss": spec.loss, "lambda": spec.lam,
               "beta": spec.beta, "target_ms": spec.target_ms, "heldout_acc": m.get("heldout_acc"),
               "expected_latency_ms": m.get("expected_latency_ms"), "argmax_latency_ms": m.get("argmax_latency_ms"),
               "derived_latency_ms": m.get("derived_latency_ms"), "arch": m.get("arch"), "epoch": m.get("epoch", 0),
               "search_epoch": m.get("search_epoch", 0),
               "finished": bool(m.get("finished")), "test_acc": m.get("test_acc"),
               "error": None if result.error is None else str(result.error).splitlines()[0][:200],
               "out_dir": out_dir}
        row.update({k: v for k, v in m.items() if k.startswith("latency_") and k.endswith("_ms")})
        rows.append(row)
    return rows


def front_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Pareto ranks among finished trials (per hardware); stopped or failed trials follow with rank -1."""
    finished = [r for r in rows if r["finished"] and r["heldout_acc"] is not None]
    table = pareto_table(finished) if finished else pd.DataFrame(columns=["trial_id", "rank", "on_front"])
    extra = pd.DataFrame(rows)
    ranked = extra.merge(table[["trial_id", "rank", "on_front"]], on="trial_id", how="left")
    ranked["rank"] = ranked["rank"].fillna(-1).astype(int)
    ranked["on_front"] = ranked["on_front"].fillna(False).astype(bool)
    ranked["status"] = ranked.apply(lambda r: "error" if r["error"] else ("finished" if r["finished"] else "stopped"),
                                    axis=1)
    order = ranked.assign(_r=ranked["rank"].where(ranked["rank"] >= 0, 10**6))
    order = order.sort_values(["hardware", "_r", "expected_latency_ms"], kind="stable").drop(columns="_r")
    return order.reset_index(drop=True)


def compute_spent(exp: Experiment, rows: list[dict[str, Any]], plan) -> dict[str, Any]:
    """Worker-epochs actually trained: the shared warm-up once, then each trial's own epochs; wall times: the
    shared warm-up's (``warmup_s``) and the whole sweep's once the cluster was up (``sweep_s``, warm-up included)."""
    workers = max(exp.sweep.workers_per_trial, 1)
    shared = plan.warmup_checkpoint is not None
    warm = exp.train.warmup_epochs if shared else 0
    trial_epochs = sum(max(int(r["epoch"] or 0) - warm, 0) for r in rows)
    return {"worker_epochs": (trial_epochs + warm) * workers, "trial_epochs": trial_epochs,
            "warmup_epochs_shared": warm, "warmup_s": plan.stats.get("warmup_s", 0.0),
            "sweep_s": plan.stats.get("sweep_s", 0.0),
            "warmup_saving_worker_epochs": warm * workers * (len(rows) - 1) if shared else 0}


def monotone_latency(table: pd.DataFrame) -> dict[str, bool | None]:
    """Per hardware: does expected latency fall (weakly) as lambda grows, over finished trials?"""
    out: dict[str, bool | None] = {}
    for hw, part in table[table["finished"] & table["lambda"].notna()].groupby("hardware"):
        lats = part.sort_values("lambda")["expected_latency_ms"].tolist()
        out[str(hw)] = all(b <= a * 1.001 for a, b in zip(lats, lats[1:])) if len(lats) > 1 else None
    return out


def summarize_sweep(exp: Experiment, grid, plan, sweep_dir: str) -> dict[str, Any]:
    """Build, print and save the sweep report; returns the summary (also ``summary.json``)."""
    rows = trial_rows(exp, grid, sweep_dir)
    table = front_table(rows)
    tmp = os.path.join(sweep_dir, ".pareto.parquet.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, os.path.join(sweep_dir, "pareto.parquet"))
    atomic_write_text(os.path.join(sweep_dir, "pareto.csv"), table.to_csv(index=False))
    finished = table[table["finished"]]
    best: dict[str, Any] = {}
    for hw, part in finished.groupby("hardware"):
        top = part.sort_values("heldout_acc", ascending=False).iloc[0]
        best[str(hw)] = {"most_accurate": _row(top), "per_target": {}}
    ranked = finished[finished["rank"] >= 0]
    for hw, targets in _targets(exp).items():
        for target in targets:
            hit = best_within_target(pareto_table(ranked.to_dict("records")), hw, target) if len(ranked) else None
            best.setdefault(hw, {"most_accurate": None, "per_target": {}})["per_target"][f"{target:g}"] = (
                None if hit is None else _row(hit))
    plot_table = finished.assign(label=finished["trial_id"])
    if len(plot_table):
        targets_col = [min(_targets(exp).get(h, [math.nan])) for h in plot_table["hardware"]]
        plot_pareto(plot_table.assign(target_ms=targets_col) if exp.sweep.loss == "mul_log" else plot_table,
                    os.path.join(sweep_dir, "pareto.png"), title=f"Pareto fronts: {exp.name}")
    hv = hypervolume_by_hardware(ranked) if len(ranked) else pd.DataFrame()
    summary = {
        "name": exp.name, "trials": len(rows), "finished": int(table["finished"].sum()),
        "stopped": int((table["status"] == "stopped").sum()), "errors": int((table["status"] == "error").sum()),
        "scheduler": exp.sweep.scheduler, "shared_warmup": plan.warmup_checkpoint is not None,
        "compute": compute_spent(exp, rows, plan), "best": best,
        "hypervolume": {str(r["hardware"]): float(r["hypervolume"]) for _, r in hv.iterrows()},
        "latency_monotone_in_lambda": monotone_latency(table),
        "files": {k: os.path.join(sweep_dir, v) for k, v in
                  (("table_parquet", "pareto.parquet"), ("table_csv", "pareto.csv"), ("plot", "pareto.png"))},
    }
    atomic_write_text(os.path.join(sweep_dir, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    print_table(table)
    return summary


def _targets(exp: Experiment) -> dict[str, list[float]]:
    return {hw: [float(t) for t in ts] for hw, ts in exp.sweep.targets_ms.items()}


def _row(r) -> dict[str, Any]:
    keys = ("trial_id", "hardware", "lambda", "beta", "target_ms", "heldout_acc", "expected_latency_ms", "arch",
            "test_acc")
    return {k: (None if (isinstance(r.get(k), float) and math.isnan(r.get(k))) else r.get(k)) for k in keys}


def print_table(table: pd.DataFrame, stream=None) -> None:
    """The Pareto table per hardware, front members marked with '*'."""
    stream = stream or sys.stdout
    for hw, part in table.groupby("hardware", sort=False):
        print(f"\n== {hw} ==", file=stream)
        print(f"{'':1} {'trial':<34} {'held-out':>8} {'E[lat] ms':>10} {'status':<8} arch", file=stream)
        for _, r in part.iterrows():
            acc = "" if r["heldout_acc"] is None or pd.isna(r["heldout_acc"]) else f"{r['heldout_acc']:.4f}"
            lat = "" if r["expected_latency_ms"] is None or pd.isna(r["expected_latency_ms"]) \
                else f"{r['expected_latency_ms']:.3f}"
            mark = "*" if r["on_front"] else " "
            print(f"{mark} {r['trial_id']:<34} {acc:>8} {lat:>10} {r['status']:<8} {r['arch'] or ''}", file=stream)
    stream.flush()
