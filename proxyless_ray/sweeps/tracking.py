"""MLflow tracking of a Ray Tune sweep, all from the Tune driver: one child run per trial, the parent's report.

:class:`MLflowTuneCallback` is a Tune ``Callback``, so it runs in the driver process and sees each trial's results
as Tune records them: a trial restarted after a failure or a restored sweep reuses its child run (found by the
trial's stable key under the parent) and epochs already logged are skipped. :func:`finish_sweep` attaches the sweep
report (``pareto.parquet``/``.csv``/``.png``, ``summary.json`` from :mod:`proxyless_ray.sweeps.report`) to the parent
and registers every finished Pareto-front network as a version of ``proxyless-<hardware>``.

A trial's output folder must be readable from the driver (one node, or a shared file system) for its files to be
uploaded; otherwise its run still gets every metric and tag, and a ``outputs_missing`` tag says where they are.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ray.tune import Callback

from proxyless_ray.config import Experiment
from proxyless_ray.latency.target import HardwareTarget
from proxyless_ray.nn.network import load_network
from proxyless_ray.sweeps.plan import TrialSpec, trial_experiment
from proxyless_ray.tracking.tracker import Tracker, experiment_params, search_tags

logger = logging.getLogger(__name__)

# Tune's own bookkeeping in every result; not search metrics.
TUNE_KEYS = frozenset({"timestamp", "time_this_iter_s", "time_total_s", "time_since_restore", "training_iteration",
                       "iterations_since_restore", "pid", "done", "checkpoint_dir_name", "should_checkpoint"})


def trial_experiment_of(config: dict[str, Any]) -> Experiment:
    """The experiment a sweep trial runs, rebuilt from its Tune config (base experiment + spec + sweep folder)."""
    t = config["trial"]
    spec = TrialSpec.from_dict(t)
    return trial_experiment(Experiment.from_dict(config["experiment"], source="sweep config"), spec,
                            config["sweep_dir"])


class MLflowTuneCallback(Callback):
    """Child run per trial under ``parent_id``: tags and params at start, metrics per result, files at the end.

    Args:
        tracker: The sweep's :class:`proxyless_ray.tracking.tracker.Tracker`.
        parent_id: The sweep's parent run (``Tracker.start_parent("sweep", ...)``).
        targets: The sweep's hardware targets as the driver resolved them, by name (they name the runs' hardware).
    """

    # a class default too: a sweep restored from a folder saved by an older release unpickles its callback
    # without calling __init__
    targets: dict[str, HardwareTarget] = {}  # never mutated

    def __init__(self, tracker: Tracker, parent_id: str, targets: dict[str, HardwareTarget] | None = None):
        self.tracker, self.parent_id, self.targets = tracker, parent_id, targets or {}
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id

    def _run_for(self, trial) -> str:
        if trial.trial_id not in self.runs:
            exp = trial_experiment_of(trial.config)
            key = trial.config["trial"]["key"]
            tags = search_tags(exp, "trial", key, self.targets.get(exp.latency.profile))
            self.runs[trial.trial_id] = self.tracker.start_child(self.parent_id, key, tags, experiment_params(exp),
                                                                 name=key)
        return self.runs[trial.trial_id]

    def _guard(self, what: str, trial, fn) -> None:
        try:
            fn()
        except Exception as err:  # the sweep must go on when the store has a hiccup
            logger.warning("MLflow: %s of trial %s failed: %s", what, trial.trial_id, err)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard("starting the run", trial, lambda: self._run_for(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS}
        self._guard("logging a result", trial, lambda: self.tracker.log_epoch(self._run_for(trial), metrics))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        def finish() -> None:
            run_id = self._run_for(trial)
            out_dir = trial_experiment_of(trial.config).output_dir
            if os.path.isfile(os.path.join(out_dir, "result.json")):
                self.tracker.client.set_tag(run_id, "outcome", "finished")
                self.tracker.finish_child(run_id, out_dir, trial.config["trial"]["hardware"])
                return
            last = trial.last_result or {}
            if last.get("finished"):  # ran to the end on a node whose disk the driver cannot read
                self.tracker.client.set_tag(run_id, "outputs_missing", out_dir)
            self.tracker.client.set_tag(run_id, "outcome", "finished" if last.get("finished") else "stopped")
            self.tracker.finish_run(run_id, "FINISHED")

        self._guard("finishing the run", trial, finish)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        def fail() -> None:
            err = trial.get_error() if hasattr(trial, "get_error") else None
            reason = str(err).strip().splitlines()[-1] if err else f"trial {trial.trial_id} errored"
            run_id = self._run_for(trial)
            self.tracker.client.set_tag(run_id, "outcome", "error")
            self.tracker.finish_run(run_id, "FAILED", reason)

        self._guard("marking the run failed", trial, fail)


def tune_callback(tracker: Tracker, parent_id: str, targets: dict[str, HardwareTarget] | None = None) -> Callback:
    """A Ray Tune ``Callback`` that keeps one child run per sweep trial under ``parent_id`` (Tune driver side).

    See :class:`MLflowTuneCallback`; with tracking disabled a callback that does nothing.
    """
    if not tracker.enabled or not parent_id:
        return Callback()
    tracker.client.update_run(parent_id, status="RUNNING")  # a resumed sweep's parent runs again
    return MLflowTuneCallback(tracker, parent_id, targets)


def finish_sweep(tracker: Tracker, parent_id: str, sweep_dir: str, summary: dict[str, Any]) -> bool:
    """Attach the sweep report to the parent, register the Pareto-front networks and close the parent.

    Args:
        tracker: The sweep's tracker.
        parent_id: The parent run.
        sweep_dir: The sweep folder holding ``pareto.parquet``, ``pareto.png`` and ``trials/<key>/``.
        summary: :func:`proxyless_ray.sweeps.report.summarize_sweep`'s result.

    Returns:
        True when the parent finished cleanly; otherwise it is FAILED with a ``failure_reason`` (local files stay).
    """
    if not tracker.enabled or not parent_id:
        return True
    import pandas as pd

    reasons: list[str] = []
    table = pd.read_parquet(os.path.join(sweep_dir, "pareto.parquet"))
    plot = os.path.join(sweep_dir, "pareto.png")
    try:
        tracker.log_parent_summary(parent_id, table, plot if os.path.isfile(plot) else None, summary)
    except Exception as err:  # the sweep is done; only the parent's record is incomplete
        reasons.append(f"uploading the sweep report failed: {type(err).__name__}: {err}")
    if tracker.register_models:
        front = table[table["on_front"].astype(bool)]
        if "finished" in front:
            front = front[front["finished"].astype(bool)]
        for _, row in front.iterrows():
            why = _register_trial(tracker, parent_id, row)
            if why:
                reasons.append(why)
    tracker.finish_run(parent_id, "FAILED" if reasons else "FINISHED", "; ".join(reasons) or None)
    return not reasons


def _register_trial(tracker: Tracker, parent_id: str, row) -> str | None:
    """Register one front trial's network against its child run; returns why it failed, or None."""
    key = str(row["trial_id"])
    try:
        run_id = tracker.find_child(parent_id, key)
        if run_id is None:
            return f"no child run for front trial {key}"
        if tracker.client.search_model_versions(f"run_id = '{run_id}'"):
            return None  # registered by an earlier attempt of this sweep
        out_dir = str(row["out_dir"])
        with open(os.path.join(out_dir, "result.json")) as fh:
            result = json.load(fh)
        test_acc = result.get("test_acc")
        acc = test_acc if test_acc is not None else row["heldout_acc"]
        folder = os.path.join(out_dir, "network")
        tracker.register_model(run_id, load_network(folder), str(row["hardware"]), float(acc),
                               float(result["latency_ms"]),
                               tags={"heldout_acc": row["heldout_acc"], "test_acc": test_acc, "trial": key,
                                     "expected_latency_ms": row["expected_latency_ms"]}, folder=folder)
    except Exception as err:  # one network failing to register must not lose the others
        return f"registering front trial {key} failed: {type(err).__name__}: {err}"
    return None
