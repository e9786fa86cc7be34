"""The Pareto table read back from MLflow: every finished child run (sweep trial or single search) of an experiment.

Used by ``proxyless-ray results`` and by the sweep for the parent's summary. The table is
:func:`proxyless_ray.pareto.pareto_table`'s (per hardware: non-dominated rank of held-out accuracy vs expected
latency) with the run id as ``trial_id`` and the run name, test accuracy and derived latency added.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from proxyless_ray.pareto import best_within_target, pareto_table


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _runs(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def results_table(uri: str, experiment: str, hardware: str | None = None, parent_id: str | None = None,
                  include_unfinished: bool = False) -> pd.DataFrame:
    """Pareto table of the finished child runs of an MLflow experiment.

    Args:
        uri: Tracking URI.
        experiment: Experiment name.
        hardware: Only this hardware (profile name).
        parent_id: Only children of this parent run (one sweep).
        include_unfinished: Also running, failed and early-stopped runs that logged both metrics.

    Returns:
        Columns ``hardware, trial_id`` (the run id) ``, lambda, beta, target_ms, heldout_acc, expected_latency_ms, arch,
        rank, on_front, run_name, kind, test_acc, derived_latency_ms``.

    Raises:
        ValueError: the experiment does not exist, or it has no matching runs (the message says what was looked for).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {known}. Run a search "
                         f"first, or pass --experiment / --tracking-uri")
    where = ["tags.role = 'child'"]
    if not include_unfinished:
        where.append("attributes.status = 'FINISHED'")
    if hardware is not None:
        where.append(f"tags.hardware = '{hardware}'")
    if parent_id is not None:
        where.append(f"tags.mlflow.parentRunId = '{parent_id}'")
    runs = _runs(client, exp.experiment_id, " and ".join(where))
    records = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if "heldout_acc" not in metrics or "expected_latency_ms" not in metrics:
            continue
        if not include_unfinished and tags.get("outcome", "finished") != "finished":
            continue  # a trial a scheduler stopped early is no front candidate
        records.append({"hardware": tags.get("hardware", tags.get("profile", "?")), "trial_id": run.info.run_id,
                        "lambda": _float(tags.get("lambda")), "beta": _float(tags.get("beta")),
                        "target_ms": _float(tags.get("target_ms")), "heldout_acc": metrics["heldout_acc"],
                        "expected_latency_ms": metrics["expected_latency_ms"],
                        "arch": tags.get("derived_arch", tags.get("current_arch"))})
    if not records:
        scope = " and ".join(where[1:]) or "any"
        raise ValueError(f"MLflow experiment {experiment!r} at {uri} has no finished search runs with held-out "
                         f"accuracy and latency ({scope}); run a search or sweep first")
    table = pareto_table(records)
    by_id = {run.info.run_id: run for run in runs}
    table["run_name"] = [by_id[r].info.run_name for r in table["trial_id"]]
    table["kind"] = [by_id[r].data.tags.get("kind") for r in table["trial_id"]]
    table["test_acc"] = [by_id[r].data.metrics.get("test_acc") for r in table["trial_id"]]
    table["derived_latency_ms"] = [by_id[r].data.metrics.get("derived_latency_ms") for r in table["trial_id"]]
    return table


def best_summary(table: pd.DataFrame, targets_ms: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The best network per hardware (most accurate, fastest front member) and per latency target.

    Args:
        table: A :func:`proxyless_ray.pareto.pareto_table` (or :func:`results_table`) DataFrame.
        targets_ms: ``{hardware: [target_ms, ...]}``; each gets the most accurate front member within it.

    Returns:
        JSON-safe ``{hardware: {"most_accurate": row, "fastest": row, "front_size": n, "within_target": {ms: row}}}``.
    """
    out: dict[str, Any] = {}
    for hw, rows in table.groupby("hardware"):
        front = rows[rows["on_front"]]
        entry: dict[str, Any] = {"front_size": len(front), "trials": len(rows)}
        if len(front):
            entry["most_accurate"] = _plain(front.sort_values("heldout_acc", ascending=False).iloc[0].to_dict())
            entry["fastest"] = _plain(front.sort_values("expected_latency_ms").iloc[0].to_dict())
        targets = (targets_ms or {}).get(str(hw), [])
        if targets:
            entry["within_target"] = {f"{t:g}": _plain(best_within_target(table, str(hw), float(t)))
                                      for t in targets}
        out[str(hw)] = entry
    return out


def _plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def format_table(table: pd.DataFrame) -> str:
    """Plain-text table per hardware, front members marked with ``*``, sorted by latency."""
    blocks = []
    for hw, rows in table.groupby("hardware", sort=True):
        rows = rows.sort_values(["expected_latency_ms", "heldout_acc"], ascending=[True, False])
        n_front = int(rows["on_front"].sum())
        names = [str(r.get("run_name") or r["trial_id"])[:40] for _, r in rows.iterrows()]
        width = max(len(n) for n in names + ["run"])
        lines = [f"== {hw}: {len(rows)} run(s), {n_front} on the Pareto front (*) ==",
                 f"{'':1} {'E[lat] ms':>10} {'held-out':>8} {'test':>7} {'coef':>12}  {'run':<{width}} arch"]
        for name, (_, r) in zip(names, rows.iterrows()):
            coef = _coef(r)
            test = "" if r.get("test_acc") is None or pd.isna(r.get("test_acc")) else f"{r['test_acc']:.4f}"
            lines.append(f"{'*' if r['on_front'] else ' '} {r['expected_latency_ms']:>10.4g} {r['heldout_acc']:>8.4f} "
                         f"{test:>7} {coef:>12}  {name:<{width}} {r['arch'] or ''}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _coef(r: pd.Series) -> str:
    for key, label in (("lambda", "λ"), ("beta", "β")):
        v = r.get(key)
        if v is not None and not pd.isna(v):
            return f"{label}={v:g}"
    return ""
