"""Latency trade-off sweeps on Ray Tune: hardware profiles x latency coefficients, each trial one search.

A trial of one worker runs its search in its Tune actor, and actors are reused from trial to trial
(:mod:`proxyless_ray.sweeps.trial`). A trial of several workers is Train-in-Tune the Ray 2.60 way (Train V2): the
Tune trial function :func:`train_driver_fn` builds a ``TorchTrainer`` whose ``TuneReportCallback`` forwards rank
0's per-epoch metrics to Tune; the trainer's run name is the trial key, so a restored trial continues its own
checkpoints. The weight warm-up does not depend on the hardware or the coefficient, so it runs once per (search
space, data, seed) and every trial's search phase starts from its checkpoint (:func:`run_warmup`). Schedulers:
FIFO, ASHA on a scalarised score, or the Pareto-aware MO-ASHA (:mod:`proxyless_ray.sweeps.schedulers`), whose rung
records are persisted beside the Tune experiment so ``--resume`` (``Tuner.restore``) keeps them. The grid of
trials and the saved plan are :mod:`proxyless_ray.sweeps.plan`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from proxyless_ray.config import Experiment
from proxyless_ray.data import cached_splits
from proxyless_ray.distributed.cluster import HeadWatch, effective_address, node_cpus
from proxyless_ray.distributed.ray_trainer import build_trainer, check_placeable, connect, describe_unmeasured
from proxyless_ray.latency.fingerprint import check_machine
from proxyless_ray.latency.profile import shipped_models
from proxyless_ray.latency.target import HardwareTarget, resolve_target, target_of
from proxyless_ray.runtime import describe, ray_worker_policy
from proxyless_ray.search.results import INCOMPLETE, check_writable, interrupted, write_search_outputs
from proxyless_ray.sweeps.plan import (
    DRIVER_SLOT,
    SWEEP_STATE,
    TRIAL_PROGRAM,
    TRIALS_DIR,
    SweepPlan,
    check_trusted,
    fallback_note,
    in_actor,
    load_plan,
    max_concurrent,
    save_plan,
    sweep_grid,
    trial_resources,
)
from proxyless_ray.sweeps.report import summarize_sweep, written_metrics
from proxyless_ray.sweeps.schedulers import build_scheduler
from proxyless_ray.sweeps.tracking import finish_sweep, tune_callback
from proxyless_ray.sweeps.trial import run_warmup, trial_fn, trial_of, tune_fault_settings, with_score

TUNE_DIR = "tune"
SCHEDULER_STATE = "scheduler_state.json"
RETRAINED_DIR = "retrained"  # the demo's fine-tuned front networks


# -- the Tune trial ------------------------------------------------------------------------------------------------


def train_driver_fn(config: dict[str, Any]) -> None:
    """A Tune trial of several workers: one distributed search (a ``TorchTrainer``), metrics forwarded to Tune.

    ``config`` holds the base experiment, this trial's spec, the sweep folder and the shared warm-up checkpoint.
    """
    exp, spec, weight = trial_of(config)
    written = written_metrics(exp.output_dir)
    if written is not None:
        # Restored after a kill that fell between this trial writing its outputs and Tune recording its end: the
        # search is over, so Tune gets its final metrics instead of a restarted Train run (its start-up), and
        # the outputs stay as they were written.
        from ray import tune

        tune.report(with_score(written, weight))
        return
    text = (config.get("latency_profiles") or {}).get(spec.hardware)  # resolved once on the sweep driver
    extra = {"init_checkpoint": config.get("warmup_checkpoint"), "progress": False,
             **({"latency_profile": text} if text else {})}
    trainer = build_trainer(exp, f"trial-{spec.key}", extra, callbacks=[ScoreReportCallback(weight)],
                            concurrent=max_concurrent(exp, ray.cluster_resources()), log=False)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is not None and (result.metrics or {}).get("finished"):
        # this trial's process is not the sweep driver's: it resolves the target itself, from the driver's text
        target = target_of(exp, text)
        with result.checkpoint.as_directory() as folder:
            write_search_outputs(exp, folder, exp.output_dir, target.model, shipped_models(), program=TRIAL_PROGRAM)


def trial_name(trial) -> str:
    """Tune trial names (and folders) are the stable trial keys."""
    return trial.config["trial"]["key"]


class ScoreReportCallback(TuneReportCallback):
    """Forwards rank 0's metrics to Tune, adding ``score = acc - w * ln(latency)`` for the ASHA baseline."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            with_score(metrics[0], self.weight)
        super().after_report(run_context, metrics, checkpoint)


# -- progress ------------------------------------------------------------------------------------------------------


class TrialLogCallback(Callback):
    """One readable line per trial event on the Tune driver (Tune's own table is turned off)."""

    def __init__(self, total: int, epochs: int):
        self.total, self.epochs, self.done, self.t0 = total, epochs, 0, time.time()

    def _key(self, trial) -> str:
        return trial.config.get("trial", {}).get("key", trial.trial_id)

    def _epoch(self, trial) -> int:
        return int((trial.last_result or {}).get("epoch") or 0)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        word = "resume  " if self._epoch(trial) else "start   "  # resumed: after a pause at the first rung
        print(f"[sweep {time.time() - self.t0:6.0f}s] {word} {self._key(trial)}", file=sys.stderr, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        print(f"[sweep {time.time() - self.t0:6.0f}s] epoch {result.get('epoch', '?'):>2} {self._key(trial)}: "
              f"held-out {result.get('heldout_acc', float('nan')):.3f} "
              f"E[lat] {result.get('expected_latency_ms', float('nan')):.3f} ms", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        word = "finished" if self._epoch(trial) >= self.epochs else "stopped "  # by the scheduler, at a rung
        print(f"[sweep {time.time() - self.t0:6.0f}s] {word} {self._key(trial)} ({self.done}/{self.total})",
              file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        print(f"[sweep {time.time() - self.t0:6.0f}s] FAILED   {self._key(trial)}", file=sys.stderr, flush=True)


# -- driver --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _shutdown_after():
    try:
        yield
    finally:
        ray.shutdown()


def resolve_targets(exp: Experiment) -> dict[str, HardwareTarget]:
    """Every hardware target of the sweep, resolved once on the driver before any trial starts: a local CPU target
    (``cpu_local``) is measured here (or read from the cache) and its profile handed to the trials as text
    (:attr:`HardwareTarget.text`), so no trial measures it again; analytic and imported targets say what they are;
    the MLflow callback tags the trials' runs from these."""
    out = {}
    for hw in exp.sweep.hardware:
        target = resolve_target(hw, exp.space, strict=exp.latency.strict)
        describe_unmeasured(target)  # measured ones are compared by each trial's rank 0 with its node
        if target.strict and exp.dist.address is None:  # the embedded cluster is this machine: refuse now
            check_machine(target.model, strict=True, unmeasured=False)
        out[hw] = target
    return out


def build_tune_scheduler(exp: Experiment, sweep_dir: str, group_sizes: dict[str, int] | None = None):
    """FIFO, ASHA on the scalarised score, or the Pareto-aware MO-ASHA with persisted rung records.

    ``group_sizes`` (trials per hardware) makes the Pareto scheduler's first rung synchronous.
    """
    sw = exp.sweep
    max_t = max(exp.train.epochs - exp.train.warmup_epochs, 1)
    common = {"time_attr": "search_epoch", "max_t": max_t, "grace_period": min(sw.grace_period, max_t),
              "reduction_factor": sw.reduction_factor}
    if sw.scheduler == "fifo":
        return build_scheduler("fifo")
    if sw.scheduler == "asha":
        return build_scheduler("asha", stop_last_trials=False, **common)
    return build_scheduler("pareto", group_by="trial.hardware", stop_last_trials=False,
                           state_path=os.path.join(sweep_dir, SCHEDULER_STATE), group_sizes=group_sizes, **common)


class TuneSigint:
    """Around ``Tuner.fit``; afterwards ``stopped`` says whether Ctrl-C stopped the sweep.

    Tune's own SIGINT handler stops the trials, saves the experiment's state and returns from ``fit`` as if the sweep
    had ended; it puts back the handler it found only then, and otherwise stays installed, where it would swallow a
    Ctrl-C during the report. So a marker goes in before, and the handler from before comes back after.
    """

    stopped = False

    def __enter__(self) -> TuneSigint:
        self.main = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
        self.previous = signal.signal(signal.SIGINT, self._marker) if self.main else None
        return self

    def __exit__(self, *exc) -> None:
        if self.main:
            self.stopped = signal.getsignal(signal.SIGINT) is self._marker
            signal.signal(signal.SIGINT, self.previous)

    @staticmethod
    def _marker(signum, frame):
        raise KeyboardInterrupt


def run_sweep(exp: Experiment, resume: bool = False, tracker=None) -> dict[str, Any]:
    """Run the experiment's sweep on Ray Tune and write the Pareto report; returns the report summary.

    Args:
        exp: Experiment with a ``sweep`` section.
        resume: Continue an interrupted sweep in ``<out_dir>/<name>`` (``Tuner.restore``): finished trials are not
            rerun and the Pareto scheduler's rung records come back from disk.
        tracker: A :class:`proxyless_ray.tracking.tracker.Tracker` (or None for no tracking).
    """
    import shutil

    import ray
    from ray import tune

    sweep_dir = os.path.abspath(exp.output_dir)
    tune_path = os.path.join(sweep_dir, TUNE_DIR)
    if resume:
        plan = load_plan(sweep_dir)
        if not tune.Tuner.can_restore(tune_path):
            raise FileNotFoundError(f"--resume: {tune_path!r} holds no restorable Tune experiment")
        check_trusted(tune_path)
    else:
        check_writable(sweep_dir)
        plan = SweepPlan(sweep_grid(exp))
        for sub in (TUNE_DIR, TRIALS_DIR, "ray", RETRAINED_DIR):  # a fresh sweep never mixes with old leftovers
            shutil.rmtree(os.path.join(sweep_dir, sub), ignore_errors=True)
        for name in (SCHEDULER_STATE, SWEEP_STATE):
            if os.path.exists(os.path.join(sweep_dir, name)):
                os.unlink(os.path.join(sweep_dir, name))
        os.makedirs(sweep_dir, exist_ok=True)

    cached_splits(exp.data, exp.space)  # bad data fails before any worker starts (and a local warm-up reuses it)
    targets = resolve_targets(exp)
    local_profiles = {hw: t.text for hw, t in targets.items() if t.text}
    embedded = effective_address(exp.dist.address) is None
    # The dashboard's State API lets Train free a stopped trial's placement group (facts P1): on for Train trials.
    # Trials in their own actor start no Train run, and Tune frees its own placement groups: the lean cluster.
    endpoint = connect(exp, num_cpus=os.cpu_count(), resources={DRIVER_SLOT: 64} if embedded else None,
                       dashboard=True if not in_actor(exp) else None)
    t0 = time.time()
    with HeadWatch(endpoint), _shutdown_after():
        check_placeable(exp, workers=max(exp.sweep.workers_per_trial, 1))
        if tracker is not None and plan.parent_run_id is None:
            # a fresh sweep gets a fresh parent run; --resume finds its id in sweep.json
            plan.parent_run_id = tracker.start_parent("sweep", f"sweep {exp.name}", exp, run_key=sweep_dir,
                                                      reuse=False)
        if exp.sweep.shared_warmup and exp.train.warmup_epochs > 0 and plan.warmup_checkpoint is None:
            tw = time.time()
            plan.warmup_key, plan.warmup_checkpoint = run_warmup(exp, sweep_dir, local_profiles)
            plan.stats["warmup_s"] = time.time() - tw
        save_plan(plan, sweep_dir)
        param_space = {
            "trial": tune.grid_search([t.to_dict() for t in plan.trials]),
            "experiment": exp.to_dict(),
            "sweep_dir": sweep_dir,
            "warmup_checkpoint": plan.warmup_checkpoint,
            "parent_run_id": plan.parent_run_id,
            "latency_profiles": local_profiles,
        }
        resources, max_trials = trial_resources(exp, ray.cluster_resources())
        note = fallback_note(exp, ray.cluster_resources())
        if note:
            print(f"[proxyless-ray] {note}", file=sys.stderr, flush=True)
        trainable = tune.with_resources(trial_fn if in_actor(exp) else train_driver_fn, resources)
        if in_actor(exp):
            # Tune snapshots the experiment whenever a trial has saved num_to_keep checkpoints since the last one
            # and warns (three lines) when that happens twice in 5 s: epochs of seconds do, harmlessly (local files)
            os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        else:  # a trial in its actor runs train.threads threads in a process of Ray's default environment
            policy, threads, why = ray_worker_policy(exp, node_cpus(exp.dist.cpus_per_worker),
                                                     max_concurrent(exp, ray.cluster_resources()))
            print(describe(policy, threads, why, "trials' Ray Train workers"), file=sys.stderr, flush=True)
        group_sizes = None
        if exp.sweep.scheduler == "pareto" and exp.sweep.synchronous_first_rung and max_trials is None:
            group_sizes = dict(Counter(spec.hardware for spec in plan.trials))
        callbacks = [TrialLogCallback(len(plan.trials), exp.train.epochs)]
        if tracker is not None:
            callbacks.append(tune_callback(tracker, plan.parent_run_id, targets))
        if resume:
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(scheduler=build_tune_scheduler(exp, sweep_dir, group_sizes),
                                            max_concurrent_trials=max_trials, reuse_actors=in_actor(exp),
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_dir, callbacks=callbacks, verbose=0,
                                          **(tune_fault_settings(exp) if in_actor(exp) else {})),
            )
        with TuneSigint() as sigint:
            grid = tuner.fit()
        plan.stats["sweep_s"] = plan.stats.get("sweep_s", 0.0) + time.time() - t0
        save_plan(plan, sweep_dir)
        done = grid.num_terminated + grid.num_errors
        if sigint.stopped or done < len(grid):
            if tracker is not None:
                tracker.finish_run(plan.parent_run_id, "KILLED", "interrupted (SIGINT)")
            raise interrupted(sweep_dir, None, f"Tune saved the sweep's state in {tune_path}")
        summary = summarize_sweep(exp, grid, plan, sweep_dir)
        if os.path.exists(os.path.join(sweep_dir, INCOMPLETE)):
            os.unlink(os.path.join(sweep_dir, INCOMPLETE))  # a resumed sweep that finished
        if tracker is not None:
            finish_sweep(tracker, plan.parent_run_id, sweep_dir, summary)
        return summary
