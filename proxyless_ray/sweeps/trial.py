"""A sweep trial of one worker, run in its Tune trial's own process; and the shared warm-up, run in the driver's.

A Train-in-Tune trial (:func:`.sweeps.sweep.train_driver_fn`) starts a Train controller, its helper actors and
a worker process that imports torch and loads the data before its first step, and a trial resumed after a pause at
the Pareto scheduler's synchronous first rung pays that again. A trial of one worker has nothing to distribute, so
:func:`trial_fn` runs the search loop in the Tune trial's actor itself, and the sweep turns on Tune's actor reuse:
the process, its imported modules and its data (one copy per process, :func:`proxyless_ray.data.cached_splits`)
serve trial after trial, a paused trial included. What a trial changes in its process is set afresh by the next
(:func:`fresh_trial_loop`): RNGs seeded from the trial's seed, the thread count, a new supernet and new optimizers,
so a reused process computes what a fresh one does. Checkpoints go out through ``tune.report`` and come back
through ``tune.get_checkpoint`` (a trial resumed, restored or retried after a failure under Tune's
``FailureConfig``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from proxyless_ray.config import Experiment
from proxyless_ray.data import cached_splits
from proxyless_ray.distributed.ray_private import TUNE_STORAGE_LOGGER
from proxyless_ray.distributed.ray_trainer import build_trainer, worker_target
from proxyless_ray.fileio import umask_mode
from proxyless_ray.latency.model import LatencyModel
from proxyless_ray.latency.profile import shipped_models
from proxyless_ray.latency.target import HardwareTarget
from proxyless_ray.pareto import scalarised_score
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import Reporter, SearchLoop
from proxyless_ray.search.results import write_search_outputs
from proxyless_ray.search.state import META_FILE, read_meta
from proxyless_ray.sweeps.plan import TRIAL_PROGRAM, TrialSpec, in_actor, trial_experiment, warmup_key
from proxyless_ray.sweeps.report import written_metrics

_SHIPPED: dict[str, LatencyModel] | None = None  # every shipped profile, read once per process
_TARGETS: dict[tuple[str, bool, str, str | None], HardwareTarget] = {}  # trials' targets, resolved once per process


def tune_fault_settings(exp: Experiment) -> dict[str, Any]:
    """Retries and kept checkpoints of trials that run in their Tune actor: what Ray Train gives the others."""
    from ray import tune

    d = exp.dist
    return {"failure_config": tune.FailureConfig(max_failures=d.max_failures),
            "checkpoint_config": tune.CheckpointConfig(num_to_keep=d.checkpoints_to_keep,
                                                       checkpoint_score_attribute="epoch",
                                                       checkpoint_score_order="max")}


def trial_of(config: dict[str, Any]) -> tuple[Experiment, TrialSpec, float]:
    """A trial's experiment, spec and score weight from its Tune config (base experiment + spec + sweep folder)."""
    base = Experiment.from_dict(config["experiment"], source="sweep config")
    t = config["trial"]
    spec = TrialSpec.from_dict(t)
    return trial_experiment(base, spec, config["sweep_dir"]), spec, config.get("score_weight", 0.05)


def with_score(m: dict[str, Any], weight: float) -> dict[str, Any]:
    """``m`` with ``score = acc - weight * ln(latency)`` added (in place) when it holds both."""
    if "heldout_acc" in m and m.get("expected_latency_ms", 0) > 0:
        m["score"] = scalarised_score(m["heldout_acc"], m["expected_latency_ms"], weight)
    return m


def shipped() -> dict[str, LatencyModel]:
    """:func:`proxyless_ray.latency.profile.shipped_models`, read once per process (the models are only read)."""
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = shipped_models()
    return _SHIPPED


def trial_target(exp: Experiment, text: str | None, where: str) -> HardwareTarget:
    """:func:`.distributed.ray_trainer.worker_target`, resolved once per process (trials only read it); the line
    comparing a measured profile with this machine is still said by every trial."""
    key = (exp.latency.profile, exp.latency.strict, exp.space.fingerprint(), text)
    if key not in _TARGETS:
        _TARGETS[key] = worker_target(exp, {"latency_profile": text} if text else {}, 0, where)
    else:
        _TARGETS[key].check_machine(where=where, unmeasured=False)
    return _TARGETS[key]


def fresh_trial_loop(exp: Experiment, config: dict[str, Any], report: Reporter, resume: str | None = None,
                     where: str = "this process") -> SearchLoop:
    """A trial's search loop with nothing carried over from what this process ran before.

    Args:
        exp: The trial's experiment.
        config: The trial's Tune config: ``latency_profiles`` (profiles the driver resolved) and
            ``warmup_checkpoint`` (the shared warm-up a fresh trial starts from) are read.
        report: The loop's reporter.
        resume: A checkpoint folder of this trial to continue from (paused, restored or retried).
        where: The machine, for the line that says a measured profile comes from another one.
    """
    seed = exp.train.seed
    # The loop seeds torch for its supernet and a checkpoint brings its own torch and Python RNG states; seeding
    # every generator here as well leaves nothing of an earlier trial for code that draws before or beside them.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(exp.train.threads or max(int(exp.dist.cpus_per_worker), 1))
    target = trial_target(exp, (config.get("latency_profiles") or {}).get(exp.latency.profile), where)
    device = "cuda" if exp.dist.gpus_per_worker > 0 else "cpu"  # Ray shows the actor only the GPU it holds
    loop = SearchLoop(exp, Comm(), report, splits=cached_splits(exp.data, exp.space), latency_model=target.model,
                      other_models=shipped(), device=device, progress=False)
    if resume is not None:
        loop.restore(resume)
        print(f"[proxyless-ray] resumed from checkpoint at epoch {loop.state.epoch}", file=sys.stderr, flush=True)
    elif config.get("warmup_checkpoint"):
        from ray import tune

        with tune.Checkpoint(config["warmup_checkpoint"]).as_directory() as folder:
            loop.restore(folder)
    return loop


def trial_fn(config: dict[str, Any]) -> None:
    """A Tune trial of one worker: the search loop in this actor, metrics and checkpoints through ``tune.report``.

    ``config`` holds the base experiment, this trial's spec, the sweep folder and the shared warm-up checkpoint.
    """
    import ray
    from ray import tune

    # Tune logs every checkpoint it persists at INFO; the driver prints one line per epoch already
    logging.getLogger(TUNE_STORAGE_LOGGER).setLevel(logging.WARNING)
    exp, spec, weight = trial_of(config)
    written = written_metrics(exp.output_dir)
    if written is not None:
        # Restored after a kill that fell between this trial writing its outputs and Tune recording its end: the
        # search is over, so Tune gets its final metrics and the outputs stay as they were written.
        tune.report(with_score(written, weight))
        return
    node_id = ray.get_runtime_context().get_node_id()
    loop: SearchLoop | None = None

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        if folder is not None and metrics.get("finished"):
            # before Tune hears of the end: the sweep's report and the MLflow callback read them at completion;
            # no torch.export program (see TRIAL_PROGRAM)
            write_search_outputs(exp, folder, exp.output_dir, loop.model, shipped(), program=TRIAL_PROGRAM)
        ckpt = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report(with_score({**metrics, "node_id": node_id, "pid": os.getpid()}, weight), checkpoint=ckpt)

    ckpt = tune.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as folder:
        loop = fresh_trial_loop(exp, config, report, resume=folder, where=f"Ray node {node_id[:8]}")
    loop.run()


# -- the shared warm-up ----------------------------------------------------------------------------------------


def run_local_warmup(wexp: Experiment, run_dir: str, profiles: dict[str, str] | None = None,
                     on_epoch: Callable[[dict[str, Any]], None] | None = None) -> str:
    """The shared warm-up of single-worker trials, in this process; returns its checkpoint folder.

    The sweep driver has loaded the data already (it checks it before any trial starts), so the warm-up costs its
    epochs and no start-up. The checkpoint is written as ``<run_dir>/checkpoint_local_epoch<NNNN>`` (a temporary
    folder renamed into place), where :func:`run_warmup` finds it next time.
    """
    end = wexp.train.warmup_epochs
    name = f"checkpoint_local_epoch{end:04d}"
    dest = os.path.join(run_dir, name)

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        if on_epoch is not None:
            on_epoch(metrics)
        if folder is None or metrics["epoch"] != end:
            return
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, f".{name}.tmp")  # not a checkpoint_* folder until complete
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        os.chmod(tmp, umask_mode(folder=True))  # the loop's checkpoint comes from mkdtemp (0700)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    fresh_trial_loop(wexp, {"latency_profiles": profiles}, report).run(until_epoch=end)
    if not os.path.isdir(dest):
        raise RuntimeError(f"the shared warm-up ended without its epoch-{end} checkpoint {dest!r}")
    return dest


def run_warmup(exp: Experiment, sweep_dir: str, profiles: dict[str, str] | None = None) -> tuple[str, str]:
    """Run (or reuse) the shared weight warm-up; returns ``(key, checkpoint path)``.

    The warm-up is a normal search stopped after ``train.warmup_epochs`` epochs; it is cached under
    ``<out_dir>/warmup/<key>`` so a second sweep with the same space, data and seed reuses it. For trials of one
    worker it runs in this process (:func:`run_local_warmup`), else on Ray Train.
    """
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
    if in_actor(exp):
        return key, run_local_warmup(wexp, os.path.join(cache, key), profiles)
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
    for name in sorted(os.listdir(run_dir), reverse=True):
        folder = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and os.path.isfile(os.path.join(folder, META_FILE)):
            if read_meta(folder)["epoch"] == epoch:
                return folder
    return None
