"""The one-command demo: a Fashion-MNIST sweep over three hardware targets, then the front networks retrained.

Runs on the embedded defaults (local Ray, sqlite MLflow in the working folder, Debian's Fashion-MNIST): one Ray
Tune sweep (``cpu_local``, this CPU profiled on first use, the Pixel-1 mobile profile and the V100 GPU profile x
several latency coefficients), a short fine-tune of every Pareto-front network from its inherited weights (side by
side, as Ray tasks), with its latency measured on this CPU afterwards, one network at a time, next to its predicted
latency on its own hardware, and a per-hardware table. Running it again starts a fresh sweep (the shared warm-up is
reused from the cache).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import pandas as pd

from proxyless_ray.config import Experiment, with_overrides
from proxyless_ray.distributed.ray_trainer import connect
from proxyless_ray.distributed.retrain import cpu_timing, fit_network, measure_latencies_ms, measure_retrained
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.latency.target import HardwareTarget, target_of
from proxyless_ray.nn.network import load_network
from proxyless_ray.sweeps.plan import TRIALS_DIR
from proxyless_ray.sweeps.sweep import RETRAINED_DIR, run_sweep
from proxyless_ray.tracking.retrain import log_retrain
from proxyless_ray.tracking.tracker import Tracker

DEMO_EXPERIMENT = "demo.yaml"
# predicted / measured beyond this factor either way is well past the local profile's own error on a quiet machine
# (docs/benchmarks.md, "local CPU profile"): the table then says the machine's speed may have moved since profiling
RATIO_DRIFT = 1.25


def demo_experiment_path() -> str:
    """``experiments/demo.yaml`` next to the package (source checkout) or in the working folder."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        path = os.path.join(root, "experiments", DEMO_EXPERIMENT)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"experiments/{DEMO_EXPERIMENT} not found in {os.getcwd()!r} or {here!r}")


def retrain_front(exp: Experiment, table: pd.DataFrame, sweep_dir: str, tracker=None) -> pd.DataFrame:
    """Fine-tune every finished front network briefly from its inherited weights, then measure each here.

    The fine-tunes run side by side (:func:`fit_in_parallel`); the latency measurements follow once they are done
    and Ray has exited (:func:`measure_front`), so a network is never timed while another one trains.
    """
    jobs = []
    front = table[table["on_front"] & table["finished"]]
    for _, r in front.iterrows():
        data = {"train_subset": exp.sweep.retrain_subset, "warmup_subset": 0} if exp.sweep.retrain_subset else {}
        texp = with_overrides(exp, latency={"profile": r["hardware"]}, dist={"workers": 0},
                              tracking={"enabled": False}, data=data)
        texp = Experiment.from_dict({**texp.to_dict(), "out_dir": os.path.join(sweep_dir, RETRAINED_DIR),
                                     "name": r["trial_id"]})
        jobs.append((r["trial_id"], texp, os.path.join(sweep_dir, TRIALS_DIR, r["trial_id"], "network")))
    # each hardware's target, resolved once here for the fits, the timing and the predictions of its networks
    by_spec: dict[str, HardwareTarget] = {}
    for _, texp, _ in jobs:
        if texp.latency.profile not in by_spec:
            by_spec[texp.latency.profile] = target_of(texp)
    targets = {tid: by_spec[texp.latency.profile] for tid, texp, _ in jobs}
    # the search's peak rate: at a fifth of it one epoch barely moved the inherited weights (figures: README)
    fitted = fit_in_parallel(exp, jobs, exp.sweep.retrain_epochs, exp.train.lr, targets=targets)
    measured = measure_front(jobs, fitted, targets)
    rows = []
    for trial_id, texp, _ in jobs:
        res = measure_retrained(texp, fitted[trial_id], measured[trial_id], target=targets[trial_id])
        if tracker is not None:
            log_retrain(tracker, res, trial_key=trial_id)
        rows.append(front_row(trial_id, res, targets[trial_id]))
    return table.merge(pd.DataFrame(rows, columns=FRONT_COLUMNS), on="trial_id", how="left")


FRONT_COLUMNS = ["trial_id", "retrained_test_acc", "measured_cpu_ms", "measured_threads", "measured_clock",
                 "predicted_ms", "latency_ratio", "profile_date"]


def front_row(trial_id: str, res: dict[str, Any], target: HardwareTarget) -> dict[str, Any]:
    """The demo table's columns of one retrained front network (``res``: :func:`measure_retrained`'s result); the
    profile's measurement date where its prediction is compared with the time measured here."""
    return {"trial_id": trial_id, "retrained_test_acc": res["test_acc"],
            "measured_cpu_ms": res["measured_cpu_latency_ms"], "measured_threads": res["measured"]["threads"],
            "measured_clock": res["measured"].get("clock", "wall"), "predicted_ms": res["predicted_latency_ms"],
            "latency_ratio": res["latency_ratio"],
            "profile_date": target.metadata.get("date") if res["latency_ratio"] is not None else None}


def measure_front(jobs: list[tuple[str, Experiment, str]], fitted: dict[str, dict[str, Any]],
                  targets: dict[str, HardwareTarget] | None = None, min_time_s: float = 2.0,
                  rounds: int = 10) -> dict[str, dict[str, Any]]:
    """Time every fitted network here, each as its target (``targets`` by key, else resolved here) is timed
    (:func:`.distributed.retrain.cpu_timing`), all together in ``rounds`` interleaved windows: a slow spell of a
    shared machine then slows every network alike, and the ratios of one table come from one measurement."""
    groups: dict[tuple[int, str], list[str]] = {}
    for tid, texp, _ in jobs:
        target = (targets or {}).get(tid) or target_of(texp)
        groups.setdefault(cpu_timing(target.model), []).append(tid)
    out: dict[str, dict[str, Any]] = {}
    for (threads, clock), tids in groups.items():
        nets = [load_network(os.path.join(fitted[tid]["out_dir"], "network")) for tid in tids]
        ms = measure_latencies_ms(nets, [n.arch for n in nets], threads=threads, min_time_s=min_time_s, clock=clock,
                                  rounds=rounds)
        out.update(zip(tids, ms))
    return out


def fit_in_parallel(exp: Experiment, jobs: list[tuple[str, Experiment, str]], epochs: int, lr: float,
                    finetune: bool = True, targets: dict[str, HardwareTarget] | None = None,
                    ) -> dict[str, dict[str, Any]]:
    """Train ``jobs`` (key, experiment, network folder or ``arch.json``) as Ray tasks of ``train.threads`` CPUs each,
    as many at once as the cluster's CPUs allow; returns each key's
    :func:`proxyless_ray.distributed.retrain.fit_network` result.

    One network at a time leaves cores idle: a fine-tune runs ``train.threads`` threads (the demo's 1), and small
    networks do not scale across threads. With one job or one slot the fit runs here, with its progress bar.
    """
    import ray

    targets = targets or {}
    threads = max(1, exp.train.threads)
    if len(jobs) < 2 or (os.cpu_count() or 1) < 2 * threads:
        return {tid: fit_network(texp, spec, finetune=finetune, epochs=epochs, lr=lr, target=targets.get(tid))
                for tid, texp, spec in jobs}
    started = not ray.is_initialized()
    before = _descendants(os.getpid())
    connect(exp, num_cpus=os.cpu_count())
    try:
        task = ray.remote(num_cpus=threads, max_retries=0)(fit_network)
        # a task is another process: it gets the target this one resolved (a small picklable profile), not its spec
        pending = {task.remote(texp, spec, finetune=finetune, epochs=epochs, lr=lr, progress=False,
                               target=targets.get(tid)): tid for tid, texp, spec in jobs}
        out: dict[str, dict[str, Any]] = {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            tid = pending.pop(ref)
            try:
                out[tid] = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise (err.cause if isinstance(err.cause, Exception) else err) from None
            print(f"[demo] trained {tid}: test {out[tid]['test_acc']:.4f} ({len(out)}/{len(jobs)})",
                  file=sys.stderr, flush=True)
        return out
    finally:
        if started:
            shutdown_and_wait(keep=before)


def shutdown_and_wait(timeout_s: float = 60.0, keep: set[int] = frozenset()) -> None:
    """``ray.shutdown()``, then wait until the processes it started (GCS, raylet, workers) have exited: they keep
    a core busy for seconds after the call returns, and latency measured then is not this machine's.

    Args:
        timeout_s: How long to wait before saying which processes are still running.
        keep: Processes that were running before Ray started (e.g. a tracking server this process runs): not
            Ray's, so not waited for.
    """
    import ray

    procs = _descendants(os.getpid()) - set(keep)
    ray.shutdown()
    t_end = time.monotonic() + timeout_s
    while procs and time.monotonic() < t_end:
        procs = {pid for pid in procs if _running(pid)}
        time.sleep(0.2)
    if procs:
        print(f"[demo] {len(procs)} Ray process(es) still running {timeout_s:.0f} s after shutdown: {sorted(procs)}",
              file=sys.stderr, flush=True)


def _stat(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first, parent pid second), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _descendants(root: int) -> set[int]:
    """Process ids below ``root`` (Linux ``/proc``; empty elsewhere)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        fields = _stat(name) if name.isdigit() else None
        if fields:
            parents[int(name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _num(value: Any, fmt: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, fmt)


def format_demo_table(table: pd.DataFrame) -> str:
    """Per-hardware table of the front networks: each derived network's latency predicted on its own hardware,
    and (after retraining) measured on this machine's CPU, with their ratio where the target is this CPU."""
    lines = []
    for hw, part in table[table["on_front"]].groupby("hardware", sort=False):
        lines.append(f"\n== {hw}: Pareto front (pred ms: the derived network predicted on {hw}) ==")
        lines.append(f"{'trial':<30} {'held-out':>8} {'pred ms':>9} {'retrained':>9} {'CPU ms*':>8} "
                     f"{'pred/meas':>9}  arch")
        for _, r in part.iterrows():
            pred = r.get("derived_latency_ms")
            pred = r.get("predicted_ms") if pred is None or pd.isna(pred) else pred
            lines.append(f"{r['trial_id']:<30} {r['heldout_acc']:>8.4f} {_num(pred, '.3f'):>9} "
                         f"{_num(r.get('retrained_test_acc'), '.4f'):>9} {_num(r.get('measured_cpu_ms'), '.3f'):>8} "
                         f"{_num(r.get('latency_ratio'), '.2f'):>9}  {r['arch']}")
    if "measured_cpu_ms" in table.columns and table["measured_cpu_ms"].notna().any():
        threads = sorted({int(t) for t in table["measured_threads"].dropna()}) if "measured_threads" in table else []
        clocks = sorted(set(table["measured_clock"].dropna())) if "measured_clock" in table else []
        clock = " and ".join("CPU time of the thread" if c == "thread" else "wall clock" for c in clocks)
        lines.append(f"\n* CPU ms: measured on this machine's CPU ({'/'.join(map(str, threads)) or '?'} thread(s), "
                     f"median of end-to-end runs, {clock or 'wall clock'}, as the target's profile was timed). "
                     f"For mobile and GPU targets it says nothing about the target; pred/meas is given only where "
                     f"the target is this CPU (cpu_local).")
    ratios = table["latency_ratio"].dropna() if "latency_ratio" in table.columns else pd.Series(dtype=float)
    if len(ratios):
        dates = sorted(set(table["profile_date"].dropna())) if "profile_date" in table.columns else []
        lines.append(f"  pred/meas: the profile's prediction over the time measured now; the profile was measured "
                     f"{' and '.join(dates) or 'at an unrecorded time'}.")
        off = ratios[(ratios < 1 / RATIO_DRIFT) | (ratios > RATIO_DRIFT)]
        if len(off):
            lines.append(f"  {len(off)} of {len(ratios)} ratios are off by more than {RATIO_DRIFT - 1:.0%}: the "
                         f"profile is cached per CPU model, and a machine's speed can change since it was measured "
                         f"(a shared host, another CPU frequency, other jobs then or now). Measure it again with "
                         f"`proxyless-ray profile --quick --space <experiment YAML>` and compare on a quiet machine.")
    return "\n".join(lines)


def searchable_kept(arch: str) -> tuple[int, int]:
    """(layers kept, searchable layers) of an arch string with zero layers in place (stage 0 is the fixed block)."""
    stages = arch.split("|")[1:]
    blocks = [b for st in stages for b in st.split(",")]
    return sum(b != "zero" for b in blocks), len(blocks)


def front_quality(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per hardware, what the front shows: its best accuracy, its span in predicted latency, how deep its most
    accurate network is, and whether the searched latency falls as lambda grows."""
    out: dict[str, dict[str, Any]] = {}
    for hw, part in table.groupby("hardware", sort=False):
        front = part[part["on_front"]]
        acc_col = "retrained_test_acc" if "retrained_test_acc" in front and front["retrained_test_acc"].notna().any() \
            else "heldout_acc"
        q: dict[str, Any] = {"front_size": int(len(front)), "accuracy": acc_col}
        if len(front):
            best = front.sort_values(acc_col, ascending=False).iloc[0]
            kept, total = searchable_kept(best["arch"])
            lat = front["argmax_latency_ms"].astype(float)
            q.update(best_acc=float(best[acc_col]), best_trial=best["trial_id"], best_layers_kept=f"{kept}/{total}",
                     front_latency_span=float(lat.max() / lat.min()) if lat.min() > 0 else None)
        by_lam = part[part["finished"]].sort_values("lambda")
        lats = [round(float(v), 4) for v in by_lam["expected_latency_ms"]]
        q["expected_latency_by_lambda"] = dict(zip([float(v) for v in by_lam["lambda"]], lats))
        q["latency_non_increasing_in_lambda"] = all(b <= a * 1.02 for a, b in zip(lats, lats[1:]))
        out[hw] = q
    return out


def format_front_quality(quality: dict[str, dict[str, Any]]) -> str:
    lines = ["\n== what the fronts show =="]
    for hw, q in quality.items():
        if not q.get("front_size"):
            lines.append(f"{hw}: no finished front network")
            continue
        span = q["front_latency_span"]
        lines.append(f"{hw}: best {q['accuracy']} {q['best_acc']:.4f} ({q['best_layers_kept']} searchable layers "
                     f"kept), front spans {span:.2f}x in predicted latency, E[lat] "
                     f"{'falls' if q['latency_non_increasing_in_lambda'] else 'does NOT fall'} as lambda grows "
                     f"{q['expected_latency_by_lambda']}")
    return "\n".join(lines)


def run_demo(exp: Experiment) -> dict[str, Any]:
    """Sweep, retrain the fronts, print the table and how to open the MLflow UI."""
    t0 = time.time()
    tracker = None
    if exp.tracking.enabled:
        tracker = Tracker(exp)
        tracker.check()
    summary = run_sweep(exp, tracker=tracker)
    sweep_dir = os.path.abspath(exp.output_dir)
    table = pd.read_parquet(summary["files"]["table_parquet"])
    if exp.sweep.retrain_epochs > 0:
        print(f"\n[demo] fine-tuning {int((table['on_front'] & table['finished']).sum())} front networks for "
              f"{exp.sweep.retrain_epochs} epoch(s) each", file=sys.stderr, flush=True)
        table = retrain_front(exp, table, sweep_dir, tracker)
        atomic_write_text(os.path.join(sweep_dir, "demo_table.csv"), table.to_csv(index=False))
    print(format_demo_table(table))
    quality = front_quality(table)
    atomic_write_text(os.path.join(sweep_dir, "demo_quality.json"), json.dumps(quality, indent=2, default=str) + "\n")
    print(format_front_quality(quality))
    print(f"\nDemo finished in {time.time() - t0:.0f} s. Outputs: {sweep_dir}")
    if tracker is not None:
        print(f"Browse every run in the MLflow UI:  proxyless-ray ui --tracking-uri {tracker.uri}")
    return {"summary": summary, "table": table, "quality": quality}
