"""Latency trade-off sweeps on Ray Tune: hardware profiles x latency coefficients, each trial a Ray Train search.

Train-in-Tune the Ray 2.60 way (Train V2): the Tune trial function :func:`train_driver_fn` builds a
``TorchTrainer`` whose ``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune; the trainer's run name
is the trial key, so a restored trial continues its own checkpoints. The weight warm-up does not depend on the
hardware or the coefficient, so it runs once per (search space, data, seed) and every trial's search phase starts
from its checkpoint. Schedulers: FIFO, ASHA on a scalarised score, or the Pareto-aware MO-ASHA
(:mod:`proxyless_ray.schedulers`), whose rung records are persisted beside the Tune experiment so ``--resume``
(``Tuner.restore``) keeps them. The grid of trials and the saved plan are :mod:`proxyless_ray.sweep_plan`.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
import time
from collections import Counter
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from proxyless_ray.config import Experiment
from proxyless_ray.latency.model import load_latency_model_for
from proxyless_ray.ray_cluster import node_cpus
from proxyless_ray.runtime import describe, ray_worker_policy
from proxyless_ray.sweep_plan import (
    SWEEP_STATE,
    TRIALS_DIR,
    SweepPlan,
    TrialSpec,
    load_plan,
    save_plan,
    sweep_grid,
    trial_experiment,
    warmup_key,
)
from proxyless_ray.sweep_report import written_metrics

TUNE_DIR = "tune"
SCHEDULER_STATE = "scheduler_state.json"
DRIVER_SLOT = "driver_slot"  # custom resource the Tune trials (Train drivers) hold instead of CPUs
RETRAINED_DIR = "retrained"  # the demo's fine-tuned front networks


# -- the Tune trial ------------------------------------------------------------------------------------------------


def train_driver_fn(config: dict[str, Any]) -> None:
    """A Tune trial: one distributed search (a ``TorchTrainer``), metrics forwarded to Tune.

    ``config`` holds the base experiment, this trial's spec, the sweep folder and the shared warm-up checkpoint.
    """
    from proxyless_ray.ray_trainer import build_trainer
    from proxyless_ray.results import write_search_outputs
    from proxyless_ray.trainer import shipped_models

    base = Experiment.from_dict(config["experiment"], source="sweep config")
    t = config["trial"]
    spec = TrialSpec(t["hardware"], t["loss"], t["lam"], t["beta"], t["target_ms"])
    exp = trial_experiment(base, spec, config["sweep_dir"])
    weight = config.get("score_weight", 0.05)
    written = written_metrics(exp.output_dir)
    if written is not None:
        # Restored after a kill that fell between this trial writing its outputs and Tune recording its end: the
        # search is over, so Tune gets its final metrics instead of a restarted Train run (~30 s of start-up), and
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
        from proxyless_ray.latency.profile import profile_from_text

        model = (profile_from_text(text, f"profile {spec.hardware!r} from the driver") if text
                 else load_latency_model_for(exp.latency.profile, exp.space))
        with result.checkpoint.as_directory() as folder:
            write_search_outputs(exp, folder, exp.output_dir, model, shipped_models())


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


def with_score(m: dict[str, Any], weight: float) -> dict[str, Any]:
    """``m`` with ``score = acc - weight * ln(latency)`` added (in place) when it holds both."""
    from proxyless_ray.pareto import scalarised_score

    if "heldout_acc" in m and m.get("expected_latency_ms", 0) > 0:
        m["score"] = scalarised_score(m["heldout_acc"], m["expected_latency_ms"], weight)
    return m


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


def trial_resources(exp: Experiment, cluster: dict[str, float]) -> tuple[dict[str, float], int | None]:
    """A Tune trial's resources, and ``max_concurrent_trials`` (None when the resources cap concurrency).

    A trial only drives its TorchTrainer; giving it a CPU would deadlock a 2-core laptop (facts P2). When the cluster
    has a ``driver_slot`` resource (the embedded one always does), each trial holds ``1/n`` of it, so at most ``n``
    trials run at once; paused trials hold none, which a synchronous first rung needs (Tune's
    ``max_concurrent_trials`` counts paused trials as running). Otherwise trials take a sliver of a CPU and
    ``max_concurrent_trials`` caps them.

    Args:
        exp: The sweep's experiment.
        cluster: The cluster's total resources (``ray.cluster_resources()``).
    """
    n = max_concurrent(exp, cluster)
    slots = cluster.get(DRIVER_SLOT, 0.0)
    if slots >= n:
        return {DRIVER_SLOT: math.floor(slots / n * 1e4) / 1e4}, None  # Ray keeps 4 decimals of a resource
    return {"CPU": 0.01}, n


def fallback_note(exp: Experiment, cluster: dict[str, float]) -> str | None:
    """What a sweep on a cluster without enough ``driver_slot`` does instead (None when it has them)."""
    _, max_trials = trial_resources(exp, cluster)
    if max_trials is None:
        return None
    sync_rung = exp.sweep.scheduler == "pareto" and exp.sweep.synchronous_first_rung
    return (f"the cluster has no {DRIVER_SLOT!r} resource, falling back: each trial takes 0.01 CPU, at most "
            f"{max_trials} run at once{', the Pareto first rung is asynchronous' * sync_rung} (give the head one: "
            f"ray start --head --resources '{{\"{DRIVER_SLOT}\": 64}}')")


def max_concurrent(exp: Experiment, cluster: dict[str, float]) -> int:
    """Trials that fit at once: ``sweep.max_concurrent_trials``, else the cluster's CPUs (or GPUs) divided by what
    one trial's workers need."""
    if exp.sweep.max_concurrent_trials:
        return exp.sweep.max_concurrent_trials
    w = max(exp.sweep.workers_per_trial, 1)
    if exp.dist.gpus_per_worker > 0:
        return max(int(cluster.get("GPU", 0) // (w * exp.dist.gpus_per_worker)), 1)
    return max(int(cluster.get("CPU", 1) // (w * exp.dist.cpus_per_worker)), 1)


def resolve_local_profiles(exp: Experiment) -> dict[str, str]:
    """``{hardware: profile YAML}`` for every local CPU target of the sweep (``cpu_local``), measured here once
    before any trial starts (or read from the cache) and handed to the trials, so no trial measures it again;
    analytic and imported targets say what they are."""
    from proxyless_ray.latency.fingerprint import check_machine
    from proxyless_ray.latency.local import is_local
    from proxyless_ray.ray_trainer import describe_unmeasured

    out = {}
    for hw in exp.sweep.hardware:
        model = load_latency_model_for(hw, exp.space, strict=exp.latency.strict)
        describe_unmeasured(model)  # measured ones are compared by each trial's rank 0 with its node
        if exp.latency.strict and exp.dist.address is None:  # the embedded cluster is this machine: refuse now
            check_machine(model, strict=True, unmeasured=False)
        if is_local(hw):
            out[hw] = model.to_yaml()
    return out


def run_warmup(exp: Experiment, sweep_dir: str, profiles: dict[str, str] | None = None) -> tuple[str, str]:
    """Run (or reuse) the shared weight warm-up; returns ``(key, checkpoint path)``.

    The warm-up is a normal search stopped after ``train.warmup_epochs`` epochs; it is cached under
    ``<out_dir>/warmup/<key>`` so a second sweep with the same space, data and seed reuses it.
    """
    from proxyless_ray.ray_trainer import build_trainer
    from proxyless_ray.search_state import read_meta

    key = warmup_key(exp)
    cache = os.path.abspath(os.path.join(exp.out_dir, "warmup"))
    d = exp.to_dict()
    d["name"] = key
    d["dist"]["workers"] = max(exp.sweep.workers_per_trial, 1)
    d["dist"]["storage_path"] = cache
    d["latency"]["profile"] = exp.sweep.hardware[0]  # only priced for metrics; alpha is frozen in warm-up
    wexp = Experiment.from_dict(d, source="warm-up")
    done = _latest_warmup_checkpoint(os.path.join(cache, key), exp.train.warmup_epochs)
    if done is not None:
        print(f"[sweep] reusing shared warm-up {key} ({done})", file=sys.stderr, flush=True)
        return key, done
    print(f"[sweep] shared warm-up {key}: {exp.train.warmup_epochs} epochs, once for every trial",
          file=sys.stderr, flush=True)
    text = (profiles or {}).get(exp.sweep.hardware[0])
    result = build_trainer(wexp, key, {"until_epoch": exp.train.warmup_epochs, "progress": False,
                                       **({"latency_profile": text} if text else {})}).fit()
    if result.error is not None:
        raise result.error
    path = result.checkpoint.path
    if read_meta(path)["epoch"] != exp.train.warmup_epochs:
        raise RuntimeError(f"warm-up checkpoint {path!r} is not at epoch {exp.train.warmup_epochs}")
    return key, path


def _latest_warmup_checkpoint(run_dir: str, epoch: int) -> str | None:
    if not os.path.isdir(run_dir):
        return None
    from proxyless_ray.search_state import META_FILE, read_meta

    for name in sorted(os.listdir(run_dir), reverse=True):
        folder = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and os.path.isfile(os.path.join(folder, META_FILE)):
            if read_meta(folder)["epoch"] == epoch:
                return folder
    return None


def build_tune_scheduler(exp: Experiment, sweep_dir: str, group_sizes: dict[str, int] | None = None):
    """FIFO, ASHA on the scalarised score, or the Pareto-aware MO-ASHA with persisted rung records.

    ``group_sizes`` (trials per hardware) makes the Pareto scheduler's first rung synchronous.
    """
    from proxyless_ray.schedulers import build_scheduler

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


def check_trusted(tune_path: str) -> None:
    """Refuse to restore a Tune folder that someone else could have written.

    ``Tuner.restore`` unpickles ``tuner.pkl`` and the trials' state from it, and unpickling runs code: the folder is
    trusted like code. Every file and folder in it (and the folder above) must belong to this user (or root) and be
    writable by nobody else.

    Raises:
        PermissionError: naming the first path that fails the check and what to do.
    """
    uid = os.getuid()
    paths = [os.path.dirname(tune_path), tune_path]
    for root, dirs, files in os.walk(tune_path):
        paths += [os.path.join(root, name) for name in dirs + files]
    for path in paths:
        st = os.lstat(path)
        if st.st_uid not in (uid, 0) or st.st_mode & 0o022:
            raise PermissionError(
                f"--resume: {path!r} is owned by uid {st.st_uid} or writable by others (mode "
                f"{stat.filemode(st.st_mode)}); Tune restores a sweep by unpickling its files, which runs code, so "
                f"only a folder that this user alone can write is resumed (chmod go-w, or start the sweep again)")


def run_sweep(exp: Experiment, resume: bool = False, tracker=None) -> dict[str, Any]:
    """Run the experiment's sweep on Ray Tune and write the Pareto report; returns the report summary.

    Args:
        exp: Experiment with a ``sweep`` section.
        resume: Continue an interrupted sweep in ``<out_dir>/<name>`` (``Tuner.restore``): finished trials are not
            rerun and the Pareto scheduler's rung records come back from disk.
        tracker: A :class:`proxyless_ray.tracking.Tracker` (or None for no tracking).
    """
    import shutil

    import ray
    from ray import tune

    from proxyless_ray.ray_cluster import HeadWatch, effective_address
    from proxyless_ray.ray_trainer import check_placeable, connect
    from proxyless_ray.results import check_writable
    from proxyless_ray.sweep_report import summarize_sweep

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
    from proxyless_ray.data import build_splits

    build_splits(exp.data, exp.space)  # bad data fails before any worker starts
    local_profiles = resolve_local_profiles(exp)
    embedded = effective_address(exp.dist.address) is None
    # The dashboard's State API lets Train free a stopped trial's placement group (facts P1): always on here.
    endpoint = connect(exp, num_cpus=os.cpu_count(), resources={DRIVER_SLOT: 64} if embedded else None,
                       dashboard=True)
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
        policy, threads, why = ray_worker_policy(exp, node_cpus(exp.dist.cpus_per_worker),
                                                 max_concurrent(exp, ray.cluster_resources()))
        print(describe(policy, threads, why, "trials' Ray Train workers"), file=sys.stderr, flush=True)
        trainable = tune.with_resources(train_driver_fn, resources)
        group_sizes = None
        if exp.sweep.scheduler == "pareto" and exp.sweep.synchronous_first_rung and max_trials is None:
            group_sizes = dict(Counter(spec.hardware for spec in plan.trials))
        callbacks = [TrialLogCallback(len(plan.trials), exp.train.epochs)]
        if tracker is not None:
            callbacks.append(tracker.tune_callback(plan.parent_run_id))
        if resume:
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(scheduler=build_tune_scheduler(exp, sweep_dir, group_sizes),
                                            max_concurrent_trials=max_trials,
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_dir, callbacks=callbacks, verbose=0),
            )
        grid = tuner.fit()
        plan.stats["sweep_s"] = plan.stats.get("sweep_s", 0.0) + time.time() - t0
        save_plan(plan, sweep_dir)
        summary = summarize_sweep(exp, grid, plan, sweep_dir)
        if tracker is not None:
            tracker.finish_sweep(plan.parent_run_id, sweep_dir, summary)
        return summary
