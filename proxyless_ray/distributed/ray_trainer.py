"""Ray Train driver: the supernet search as a ``TorchTrainer`` of N workers (Ray actors), Train V2 API.

``train_fn_per_worker`` runs :class:`~proxyless_ray.search.loop.SearchLoop` on every worker (gloo on CPU, NCCL on
GPU; the process group comes from Ray); ``train_driver_fn`` builds the trainer with a stable run name, so running
it again with the same ``(storage_path, name)`` continues from the latest checkpoint (Train V2's restore
pattern), and worker failures retry from the last checkpoint under ``FailureConfig``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from ray.train import UserCallback

from proxyless_ray.config import Experiment
from proxyless_ray.data import DamagedShard, build_splits
from proxyless_ray.distributed.cluster import ClusterError, Endpoint, HeadWatch, attach, effective_address, node_cpus
from proxyless_ray.distributed.ray_private import (
    mark_lean_cluster,
    quiet_worker_logs,
    set_lean_env,
    trainer_class,
)
from proxyless_ray.distributed.resume import latest_ray_checkpoint, resume_point
from proxyless_ray.latency.fingerprint import machine_note
from proxyless_ray.latency.profile import shipped_models
from proxyless_ray.latency.target import HardwareTarget, target_of
from proxyless_ray.progress import format_epoch
from proxyless_ray.runtime import WORKER_ENV, describe, ray_worker_policy, thread_env
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.search.results import INCOMPLETE, Interrupted, check_writable, interrupted, write_search_outputs
from proxyless_ray.search.state import DamagedCheckpoint, TrainingDiverged
from proxyless_ray.tracking.search import SearchTracking

RUN_PREFIX = "search"


# -- worker side -------------------------------------------------------------------------------------------------


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (config is plain dicts: the Ray boundary)."""
    import ray
    import ray.train
    import ray.train.torch

    quiet_worker_logs()

    exp = Experiment.from_dict(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if exp.train.threads == 0:
        import torch

        torch.set_num_threads(max(int(exp.dist.cpus_per_worker), 1))

    node_id = ray.get_runtime_context().get_node_id()
    target = worker_target(exp, config, rank, f"Ray node {node_id[:8]}")

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report({**metrics, "node_id": node_id, "pid": os.getpid()}, checkpoint=ckpt)

    device = ray.train.torch.get_device()
    loop = SearchLoop(exp, Comm(rank, world), report, latency_model=target.model, other_models=shipped_models(),
                      device=device, progress=config.get("progress", False))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            loop.restore(folder)
        if rank == 0:
            print(f"[proxyless-ray] resumed from checkpoint at epoch {loop.state.epoch}", file=sys.stderr, flush=True)
    elif config.get("init_checkpoint"):
        with ray.train.Checkpoint(config["init_checkpoint"]).as_directory() as folder:
            loop.restore(folder)
    loop.run(until_epoch=config.get("until_epoch"))


def worker_target(exp: Experiment, config: dict[str, Any], rank: int, where: str) -> HardwareTarget:
    """The search's hardware target on a worker, compared with the node it runs on.

    A worker is another process than the driver (often on another node), so it resolves the target again; a
    profile the driver resolved (``cpu_local``, measured once there) comes as YAML text in
    ``config["latency_profile"]``: workers on other nodes share no disk and must not measure it again. Rank 0 says
    in one line when a measured profile was measured on another kind of machine than this node; in strict mode
    every rank refuses it.
    """
    import io

    target = target_of(exp, config.get("latency_profile"))
    target.check_machine(where=where, stream=None if rank == 0 else io.StringIO(), unmeasured=False)
    return target


def describe_unmeasured(target: HardwareTarget) -> None:
    """On the driver: one line saying an analytic or imported profile is not compared with any machine (the
    workers compare measured ones with their node)."""
    if target.metadata and target.kind != "measured":
        print(f"[proxyless-ray] {machine_note(target.model)}", file=sys.stderr, flush=True)


def driver_profile_text(target: HardwareTarget) -> dict[str, str]:
    """``{"latency_profile": yaml}`` for a profile the driver resolved (``cpu_local``), else ``{}``."""
    return {"latency_profile": target.text} if target.text else {}


# -- driver side -------------------------------------------------------------------------------------------------


def connect(exp: Experiment, num_cpus: int | None = None, resources: dict[str, float] | None = None,
            dashboard: bool | None = None) -> Endpoint | None:
    """Attach to the experiment's cluster, or start an embedded one; returns the cluster's endpoint (None: embedded
    or already connected).

    The cluster is ``dist.address``, else ``RAY_ADDRESS`` (inside ``ray job submit``); attaching checks it answers
    and finds Ray's token when it wants one, failing in one line otherwise
    (:func:`proxyless_ray.distributed.cluster.attach`).

    ``address="local"`` always starts a fresh embedded instance, so a stale cluster file left by a killed process
    is never picked up by mistake. The embedded instance is lean: no preemption watcher (a laptop is not preempted)
    and, unless ``dashboard`` (default ``dist.dashboard``), no dashboard, no metrics and slower log and statistics
    polling (:data:`~proxyless_ray.distributed.ray_private.LEAN_ENV`). Every idle Ray process takes CPU time that a
    worker waits for in every all-reduce; trainers built on a cluster without the dashboard also leave out two of
    Train's helper actors (:func:`~proxyless_ray.distributed.ray_private.trainer_class`). The measured effect is in
    ``docs/benchmarks.md`` (lean embedded cluster).
    """
    import ray

    if ray.is_initialized():
        return None
    address = effective_address(exp.dist.address)
    mark_lean_cluster(False)
    if address is None:
        dashboard = exp.dist.dashboard if dashboard is None else dashboard
        set_lean_env(lean=not dashboard)
        ray.init(address="local", num_cpus=num_cpus, resources=resources, log_to_driver=True,
                 configure_logging=False, include_dashboard=dashboard)
        mark_lean_cluster(not dashboard)
        return None
    return attach(address, exp.dist.connect_timeout_s)


def check_placeable(exp: Experiment, workers: int | None = None) -> None:
    """Refuse a run the cluster can never place (instead of an endless pending state)."""
    import ray

    workers = exp.dist.workers if workers is None else workers
    total = ray.cluster_resources()
    need = {"CPU": exp.dist.cpus_per_worker, "GPU": exp.dist.gpus_per_worker, **exp.dist.resources_per_worker}
    for key, per_worker in need.items():
        if per_worker and total.get(key, 0.0) + 1e-9 < per_worker * workers:
            raise ClusterError(f"{workers} workers x {per_worker:g} {key} need {per_worker * workers:g} {key}, but the "
                               f"cluster has {total.get(key, 0.0):g}; lower --workers or the per-worker resources")


def storage_path(exp: Experiment) -> str:
    """Where Ray Train keeps checkpoints: ``dist.storage_path`` (local or URI), else ``<output>/ray``."""
    return exp.dist.storage_path or os.path.abspath(os.path.join(exp.output_dir, "ray"))


def build_trainer(exp: Experiment, name: str, extra_config: dict[str, Any] | None = None,
                  callbacks: list | None = None, train_fn: Callable[[dict[str, Any]], None] = train_fn_per_worker,
                  concurrent: int = 1, log: bool = True):
    """The ``TorchTrainer`` of a search (``train_driver_fn``'s body; Tune trials call it too).

    ``train_fn`` replaces the per-worker function (a benchmark's own loop over the same workers and resources).
    ``concurrent`` trainers like this one may run at once (a sweep's trials): with the workers' threads and CPUs it
    picks their OpenMP wait policy (:func:`~proxyless_ray.runtime.ray_worker_policy`), logged unless ``log`` is off.
    """
    import ray.train
    from ray.train.torch import TorchConfig

    d = exp.dist
    policy, threads, why = ray_worker_policy(exp, node_cpus(d.cpus_per_worker), concurrent)
    if log:
        print(describe(policy, threads, why, "Ray Train workers"), file=sys.stderr, flush=True)
    use_gpu = d.gpus_per_worker > 0
    resources = {"CPU": d.cpus_per_worker, **d.resources_per_worker}
    if use_gpu:
        resources["GPU"] = d.gpus_per_worker
    return trainer_class()(
        train_fn,
        train_loop_config={"experiment": exp.to_dict(), **(extra_config or {})},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=d.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path(exp),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.checkpoints_to_keep,
                                                         checkpoint_score_attribute="epoch",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # one line per epoch is ours to print
            worker_runtime_env={"env_vars": {**WORKER_ENV, **thread_env(policy == "passive")}},
        ),
    )


def run_name(exp: Experiment) -> str:
    return f"{RUN_PREFIX}-{exp.name}"


def run_ray_search(exp: Experiment, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Run a search on Ray Train and write the same outputs as an in-process search.

    Args:
        exp: The experiment (``dist`` says how many workers and where).
        resume: Continue the run with the same ``(storage_path, name)`` from its latest checkpoint.
        callbacks: Extra Ray Train ``UserCallback``s (they run in the Train controller process).
    """
    import ray

    out = exp.output_dir
    check_writable(out)
    tracking = SearchTracking(exp, resume)  # MLflow: fails fast on an unreachable store, before any training
    tracking.check()
    target = target_of(exp)  # the driver's: the outputs and the MLflow tags take it; workers resolve their own
    describe_unmeasured(target)

    build_splits(exp.data, exp.space)  # bad data fails here, before any worker starts
    name = run_name(exp)
    run_dir = os.path.join(storage_path(exp), name)
    stopped_early = os.path.exists(os.path.join(out, INCOMPLETE))  # Ctrl-C, maybe before Ray made the run folder
    if resume and "://" not in run_dir and not os.path.isdir(run_dir) and not stopped_early:
        raise FileNotFoundError(f"--resume: no previous run at {run_dir!r}")
    if not resume and "://" not in run_dir and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # same (storage_path, name) would resume: a fresh run starts clean
    init = {}
    if resume and "://" not in run_dir:  # a damaged newest checkpoint: resume from the newest intact one
        restart_from = resume_point(run_dir, exp)
        if restart_from is not None:
            init = {"init_checkpoint": restart_from}
            print(f"--resume: resuming from {restart_from}", file=sys.stderr, flush=True)
        elif latest_ray_checkpoint(run_dir) is None:
            print(f"--resume: {run_dir} holds no checkpoint (the run stopped before its first one); starting from "
                  f"scratch", file=sys.stderr, flush=True)
    endpoint = connect(exp, num_cpus=os.cpu_count())  # an embedded cluster is this machine: never more CPUs
    with HeadWatch(endpoint):  # a head that dies mid-run: one line and the resume command, no minute-long hang
        try:
            check_placeable(exp)
            with tracking.active(target):  # MLflow runs, logged from the Train controller; FAILED on errors
                trainer = build_trainer(exp, name,
                                        {"progress": True, **init, **driver_profile_text(target)},
                                        callbacks=[EpochLogCallback(), *tracking.callbacks(), *(callbacks or [])])
                result = trainer.fit()
                if result.error is not None:
                    raise_train_error(result.error)
                if result.checkpoint is None:
                    raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
                with result.checkpoint.as_directory() as folder:
                    res = write_search_outputs(exp, folder, out, target.model, shipped_models())
                tracking.finish(out, res)
        except KeyboardInterrupt as err:
            if isinstance(err, Interrupted):
                raise
            raise interrupted(out, latest_ray_checkpoint(run_dir) if "://" not in run_dir else None) from None
        finally:
            ray.shutdown()
    print(json.dumps({k: res[k] for k in ("arch", "latency_ms", "test_acc", "profile")}), flush=True)
    return res


def raise_train_error(err: BaseException) -> None:
    """Re-raise a Ray Train run's error; a worker's diverged loss, damaged shard or checkpoint as a one-line error.

    A worker's exception comes back wrapped (a ``RayTaskError`` subclass of the original type, inside Train's
    failure); a diverged loss is an input problem (a learning rate too high) that the CLI reports in one line.
    """
    seen: list[BaseException] = []
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        for kind in (TrainingDiverged, DamagedShard, DamagedCheckpoint):
            if isinstance(e, kind):
                raise kind(str(e).strip().splitlines()[-1].split(f"{kind.__name__}: ")[-1]) from None
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None),
                 *(failures.values() if isinstance(failures, dict) else [])]
    raise err


class ReportLog(UserCallback):
    """Appends every committed report (all ranks' metrics) to a JSON-lines file on the controller's node.

    Only reports the controller committed are written, so a worker failure never duplicates an epoch here.
    """

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint is not None}) + "\n")


def read_report_log(path: str) -> list[dict[str, Any]]:
    """The records :class:`ReportLog` wrote (empty when the file does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class EpochLogCallback(UserCallback):
    """Prints one line per committed report (rank 0's metrics) from the Train controller."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            print(format_epoch(metrics[0]), file=sys.stderr, flush=True)
