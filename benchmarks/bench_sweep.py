"""Benchmark: the Pareto-aware scheduler with a shared warm-up against the full grid. Prints one JSON object.

Fashion-MNIST, the small space, 2 hardware profiles x 6 lambda values (12 trials), the same seeds in both runs:

* ``full``: every trial runs every epoch, its own warm-up included (FIFO, no shared warm-up);
* ``pareto``: the warm-up runs once and every trial starts its search phase from it; MO-ASHA stops trials that
  are dominated at a rung among trials of the same hardware.

Reported: compute spent (worker-epochs and wall time) and the hypervolume of each hardware's front (held-out
accuracy up, expected latency down), both under the same reference point per hardware; targets: >= 2x less
compute, >= 1.8x less wall time, hypervolume within 3 % of the full grid. Also whether expected latency falls
monotonically as lambda grows, per hardware (on the full grid, where every trial finishes).

And a third sweep, ``fixed``: the same grid under FIFO with trials of 2 weight steps per epoch and small evaluation
splits, whose wall time is nearly all start-up: ``fixed_cost_per_trial_s`` = its wall time (after the cluster is up)
x trials at once / trials; target <= 5 s. Its trials re-estimate BatchNorm statistics on 1 training batch
(``train.bn_recal_batches``, 20 by default) before each held-out reading: the probe measures what starting and running
a trial costs beyond its compute, and nobody reads its accuracies, so the 20 batches' convolutions (the largest part
of a 2-step trial's compute) would only hide that cost. Beside it, ``compute_per_trial_s``: what a trial computed on
average, from its own per-epoch metrics (weight steps, data and architecture steps: ``epoch_s``; the held-out and
test readings: ``eval_s``), and ``left_per_trial_s``, the fixed cost less that compute.

Usage: ``python benchmarks/bench_sweep.py [--quick] [--fixed-only]`` (``--quick`` uses 3 lambdas and fewer images
to check the plumbing; ``--fixed-only`` runs only the ``fixed`` sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import pandas as pd

from proxyless_ray.config import Experiment
from proxyless_ray.pareto import hypervolume_by_hardware, pareto_table, shared_references
from proxyless_ray.sweeps.plan import TRIALS_DIR
from proxyless_ray.sweeps.report import monotone_latency
from proxyless_ray.sweeps.sweep import SCHEDULER_STATE, run_sweep

HARDWARE = ["cpu_1thread", "v100_roofline"]
LAMBDAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def experiment(mode: str, out: str, quick: bool, reduction_factor: float = 2) -> Experiment:
    lambdas = LAMBDAS[::2] if quick else LAMBDAS
    if mode == "fixed":  # trials of a few steps: what is left is the cost of starting (and resuming) a trial
        return Experiment.from_dict({
            "name": mode, "out_dir": out,
            "data": {"train_subset": 1500, "heldout_size": 256, "test_subset": 256, "batch_size": 64},
            "train": {"epochs": 5, "warmup_epochs": 2, "max_steps_per_epoch": 2, "ready_samples": 0, "threads": 1,
                      "seed": 0, "bn_recal_batches": 1},
            "sweep": {"hardware": HARDWARE, "lambdas": lambdas, "scheduler": "fifo", "shared_warmup": False,
                      "workers_per_trial": 1, "max_concurrent_trials": max(min(os.cpu_count() or 1, 2), 1)},
            "tracking": {"enabled": False},
        })
    return Experiment.from_dict({
        "name": mode, "out_dir": out,
        "data": {"train_subset": 1500 if quick else 4000, "heldout_size": 1000, "test_subset": 2000,
                 "batch_size": 64},
        "train": {"epochs": 5, "warmup_epochs": 2, "arch_lr": 0.3, "arch_update_every": 2, "threads": 1,
                  "seed": 0},
        "sweep": {"hardware": HARDWARE, "lambdas": lambdas, "scheduler": "fifo" if mode == "full" else "pareto",
                  "shared_warmup": mode != "full", "grace_period": 1, "reduction_factor": reduction_factor,
                  "workers_per_trial": 1},
        "tracking": {"enabled": False},
    })


def first_rung_decisions(sweep_dir: str) -> dict[str, dict[str, int]]:
    """Per hardware: how many trials the Pareto scheduler continued and stopped at its first rung."""
    with open(os.path.join(sweep_dir, SCHEDULER_STATE)) as fh:
        records = json.load(fh)["records"]
    out = {}
    for hw, rungs in records.items():
        first = rungs[min(rungs, key=float)]
        out[hw] = {d: sum(r["decision"] == d for r in first.values()) for d in ("CONTINUE", "STOP")}
    return out


def trial_compute(trials_dir: str) -> dict[str, float]:
    """Per trial, on average: seconds of weight steps, of all the epoch's training work and of the readings, from
    each trial's ``metrics.jsonl``."""
    sums = {"weight_step_s": 0.0, "epoch_s": 0.0, "eval_s": 0.0}
    keys = sorted(os.listdir(trials_dir))
    for key in keys:
        with open(os.path.join(trials_dir, key, "metrics.jsonl")) as fh:
            for line in fh:
                m = json.loads(line)
                for name in sums:
                    sums[name] += m[name]
    return {name: v / max(len(keys), 1) for name, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fixed-only", action="store_true", help="only the sweep of few-step trials")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reduction-factor", type=float, default=2,
                        help="the Pareto scheduler's reduction factor (rungs at search epochs 1, rf, rf^2, ...)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench-sweep-")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    fexp = experiment("fixed", out, args.quick)
    fixed = run_sweep(fexp)["compute"]
    trials = len(fexp.sweep.hardware) * len(fexp.sweep.lambdas)
    per_trial = fixed["sweep_s"] * fexp.sweep.max_concurrent_trials / trials
    own = trial_compute(os.path.join(fexp.output_dir, TRIALS_DIR))
    compute = own["epoch_s"] + own["eval_s"]
    fixed_report = {
        "trials": trials, "concurrency": fexp.sweep.max_concurrent_trials, "sweep_s": fixed["sweep_s"],
        "fixed_cost_per_trial_s": per_trial,
        # what each trial computed (in its own process, beside the other trial running at once) and what is left
        "compute_per_trial_s": compute, "weight_step_per_trial_s": own["weight_step_s"],
        "eval_per_trial_s": own["eval_s"], "left_per_trial_s": per_trial - compute,
        "bn_recal_batches": fexp.train.bn_recal_batches,
    }
    if args.fixed_only:
        print(json.dumps({"benchmark": "sweep", "fixed": fixed_report, "targets": {"fixed_cost_per_trial_s": 5.0},
                          "out": out}, default=float))
        return
    summaries, tables = {}, {}
    for mode in ("full", "pareto"):
        exp = experiment(mode, out, args.quick, args.reduction_factor)
        summaries[mode] = run_sweep(exp)
        tables[mode] = pd.read_parquet(os.path.join(out, mode, "pareto.parquet"))
    finished = {m: t[t["finished"]] for m, t in tables.items()}
    ranked = {m: pareto_table(t.to_dict("records")) for m, t in finished.items()}
    refs = shared_references(*ranked.values())
    hv = {m: {r["hardware"]: r["hypervolume"] for _, r in hypervolume_by_hardware(t, refs).iterrows()}
          for m, t in ranked.items()}
    compute = {m: s["compute"] for m, s in summaries.items()}
    report = {
        "benchmark": "sweep", "hardware": HARDWARE, "lambdas": LAMBDAS[::2] if args.quick else LAMBDAS,
        "compute": compute,
        "compute_ratio_worker_epochs": compute["full"]["worker_epochs"] / max(compute["pareto"]["worker_epochs"], 1),
        # wall time of everything each mode ran once its cluster was up (sweep_s holds the shared warm-up)
        "compute_ratio_wall": compute["full"]["sweep_s"] / max(compute["pareto"]["sweep_s"], 1e-9),
        "reduction_factor": args.reduction_factor,
        "hypervolume": hv,
        "hypervolume_ratio": {hw: hv["pareto"].get(hw, 0.0) / hv["full"][hw] if hv["full"].get(hw) else None
                              for hw in HARDWARE},
        "references": refs,
        "stopped_trials_pareto": summaries["pareto"]["stopped"],
        # the first rung waits for every trial of a hardware: the trials that go on are paused once and resumed
        # from their checkpoint (a resume costs start-up time, counted in the wall figures, not in worker-epochs)
        "synchronous_first_rung": exp.sweep.synchronous_first_rung,
        "first_rung_decisions_pareto": first_rung_decisions(os.path.join(out, "pareto")),
        "latency_monotone_in_lambda_full": monotone_latency(tables["full"]),
        "latency_by_lambda_full": {hw: part.sort_values("lambda")[["lambda", "expected_latency_ms", "heldout_acc"]]
                                   .to_dict("records") for hw, part in tables["full"].groupby("hardware")},
        "fixed": fixed_report,
        "targets": {"compute_ratio": 2.0, "compute_ratio_wall": 1.8, "hypervolume_within": 0.03,
                    "fixed_cost_per_trial_s": 5.0},
        "out": out,
    }
    print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
