"""Retrain a derived network (from scratch, or fine-tuned from inherited weights) and measure it on this device.

The architecture comes from an ``arch.json`` (or an exported network folder), an MLflow run (``runs:/<id>``) or a
registered model (``models:/<name>/<version>``). Training runs through the same drivers as the search: in-process
for ``dist.workers == 0``, else Ray Train workers with the same sharding and gradient all-reduce.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from proxyless_ray.config import Experiment
from proxyless_ray.distributed.ray_trainer import (
    EpochLogCallback,
    check_placeable,
    connect,
    quiet_worker_logs,
    raise_train_error,
    storage_path,
    trainer_class,
)
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.latency.check import measure_networks
from proxyless_ray.latency.fingerprint import machine_note
from proxyless_ray.latency.local import quick_settings
from proxyless_ray.latency.model import arch_latency
from proxyless_ray.latency.target import HardwareTarget, target_of
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import ProxylessNet, export_network, load_network, load_tensors
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.results import Interrupted, check_writable
from proxyless_ray.search.retrain_loop import RetrainLoop, build_splits_for
from proxyless_ray.tracking.registry import load_registered, network_files
from proxyless_ray.tracking.store import check_existing_store
from proxyless_ray.tracking.tracker import check_reachable, resolve_uri


@dataclass
class ArchSource:
    """A resolved ``--arch``: the architecture, optional weights to fine-tune from, and where it came from."""

    arch: Arch
    state_dict: dict[str, torch.Tensor] | None
    run_id: str | None  # the MLflow run that produced it, if known
    label: str


def resolve_arch(spec: str, tracking_uri: str | None = None) -> ArchSource:
    """Resolve ``arch.json`` / a network folder / ``runs:/<id>[/path]`` / ``models:/<name>/<version>``.

    Raises:
        FileNotFoundError / ValueError: naming the spec when it cannot be found or parsed.
    """
    if spec.startswith(("runs:/", "models:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        check_existing_store(tracking_uri or mlflow.get_tracking_uri())  # a lookup never creates a store
        try:
            if spec.startswith("models:/"):
                model = load_registered(tracking_uri or mlflow.get_tracking_uri(), spec)
                if not isinstance(model, ProxylessNet):
                    raise ValueError(f"{spec} is not a proxyless_ray network (got {type(model).__name__})")
                name, _, version = spec[len("models:/"):].partition("/")
                client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                mv = client.get_model_version(name, version) if version.isdigit() else None
                return ArchSource(model.arch, model.state_dict(), mv.run_id if mv else None, spec)
            run_id, _, path = spec[len("runs:/"):].partition("/")
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path or "",
                                                         dst_path=tempfile.mkdtemp(prefix="proxyless-arch-"),
                                                         tracking_uri=tracking_uri)
        except MlflowException as err:
            raise ValueError(f"cannot resolve --arch {spec!r}: {err.message}") from None
        src = _from_path(os.path.join(folder, "arch.json") if os.path.isdir(folder) else folder, spec)
        return ArchSource(src.arch, src.state_dict, run_id, spec)
    return _from_path(spec, spec)


def _from_path(path: str, label: str) -> ArchSource:
    if os.path.isdir(path):
        path = network_files(path) or path  # a run's artifacts keep them under network/
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    arch_path = os.path.join(path, "arch.json") if os.path.isdir(path) else path
    if not os.path.exists(arch_path):
        raise FileNotFoundError(f"--arch {label!r}: {arch_path!r} does not exist")
    arch = Arch.load(arch_path).without_zeros()
    state = None
    for candidate in (os.path.join(folder, "state_dict.pt"), os.path.join(folder, "network", "state_dict.pt")):
        if os.path.isfile(candidate):
            state = load_tensors(candidate)  # weights only: a file beside an arch.json is not trusted to run code
            break
    run_id = arch.meta.get("mlflow_run_id")
    return ArchSource(arch, state, run_id, label)


def measure_latency_ms(net: nn.Module, arch: Arch, batch: int = 1, threads: int = 1, min_time_s: float = 1.0,
                       repeats: int = 30, clock: str = "wall") -> dict[str, float]:
    """End-to-end forward latency on this CPU: median and IQR over repeats after a warm-up, timed as profiles are
    (tuned allocator, pinned threads; ``clock`` as the target profile's, see
    :func:`proxyless_ray.latency.check.measure_network`)."""
    return measure_latencies_ms([net], [arch], batch, threads, min_time_s, repeats, clock)[0]


def measure_latencies_ms(nets: list[nn.Module], archs: list[Arch], batch: int = 1, threads: int = 1,
                         min_time_s: float = 1.0, repeats: int = 30, clock: str = "wall",
                         rounds: int = 1) -> list[dict[str, float]]:
    """:func:`measure_latency_ms` of several networks timed together in ``rounds`` interleaved windows."""
    ms = measure_networks(archs, "cpu", threads, batch, "median", min_time_s, repeats, clock=clock, nets=nets,
                          rounds=rounds)
    return [{"median_ms": m["ms"], "iqr_ms": m["spread_ms"] * 1.349, "count": m["count"], "threads": threads,
             "batch": batch, "clock": clock} for m in ms]


def save_retrained(net: ProxylessNet, folder: str, metrics: dict[str, Any]) -> None:
    """Checkpoint of a retrained network: ``arch.json``, ``state_dict.pt`` and ``metrics.json``."""
    os.makedirs(folder, exist_ok=True)
    net.arch.save(os.path.join(folder, "arch.json"))
    tmp = os.path.join(folder, ".state_dict.pt.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, os.path.join(folder, "state_dict.pt"))
    atomic_write_text(os.path.join(folder, "metrics.json"), json.dumps(metrics) + "\n")


def retrain_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point of ``proxyless-ray train``."""
    import ray.train

    quiet_worker_logs()

    exp = Experiment.from_dict(config["experiment"])
    arch = Arch.from_dict(config["arch"])
    ctx = ray.train.get_context()
    comm = Comm(ctx.get_world_rank(), ctx.get_world_size())
    state = config.get("state_dict")  # travels in the config: workers on other nodes share no disk

    def report(metrics: dict[str, Any], loop: RetrainLoop) -> None:
        folder = None
        if comm.rank == 0 and metrics.get("finished"):
            folder = tempfile.mkdtemp(prefix="proxyless-retrain-")
            save_retrained(loop.net, folder, metrics)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    import ray.train.torch

    RetrainLoop(exp, arch, comm, report, state, config.get("epochs"), config.get("lr"),
                device=ray.train.torch.get_device(), progress=False).run()


def run_retrain(exp: Experiment, spec: str, finetune: bool = False, epochs: int | None = None,
                lr: float | None = None) -> dict[str, Any]:
    """Train the network ``spec`` names on the experiment's data, export it and measure it on this device.

    Args:
        exp: Experiment (data, training recipe, ``dist`` for workers, ``latency.profile`` for the prediction).
        spec: ``arch.json`` / network folder / ``runs:/<id>`` / ``models:/<name>/<version>``.
        finetune: Start from the inherited weights that come with the architecture (else from scratch).
        epochs: Training epochs (default ``train.epochs``).
        lr: Peak learning rate (default ``train.lr``).

    Returns:
        The ``result.json`` content: test top-1, measured and predicted latency, files.
    """
    target = target_of(exp)
    return measure_retrained(exp, fit_network(exp, spec, finetune, epochs, lr, target=target), target=target)


def fit_network(exp: Experiment, spec: str, finetune: bool = False, epochs: int | None = None,
                lr: float | None = None, progress: bool = True, target: HardwareTarget | None = None,
                ) -> dict[str, Any]:
    """The training half of :func:`run_retrain`: train and export, no latency measured.

    Returns the result so far (accuracies, files, ``out_dir``); :func:`measure_retrained` completes it. Several
    fits may run at once (the demo's parallel fine-tunes) while the measurements wait for a quiet machine.
    ``target`` is the experiment's hardware target as the caller resolved it; without one it is resolved here, so a
    bad profile fails before any training.
    """
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr!r}")
    tracking_uri = None
    if exp.tracking.enabled:
        tracking_uri = resolve_uri(exp.tracking)
        check_reachable(tracking_uri)  # before training, not after it: the run is logged at the end
    source = resolve_arch(spec, tracking_uri)
    arch = source.arch
    if finetune and source.state_dict is None:
        raise ValueError(f"--finetune: {spec!r} comes without weights (no state_dict.pt beside it)")
    build_splits_for(exp, arch)  # shape / data errors before any worker starts
    if target is None:
        target_of(exp)  # a bad profile, too
    out = os.path.join(exp.output_dir, "retrained", arch.name or "network")
    check_writable(out)
    state = source.state_dict if finetune else None
    log(f"[train] {arch.arch_string()} from {source.label} ({'fine-tune' if finetune else 'from scratch'})")
    try:
        if exp.dist.workers == 0:
            final: dict[str, Any] = {}

            def report(metrics: dict[str, Any], loop: RetrainLoop) -> None:
                log(f"[train] epoch {metrics['epoch']}: train {metrics['train_acc']:.4f} test "
                    f"{metrics['test_acc']:.4f}")
                final.update(metrics)

            loop = RetrainLoop(exp, arch, Comm(), report, state, epochs, lr, progress=progress)
            loop.run()
            net = loop.net
        else:
            net, final = _fit_on_ray(exp, arch, state, epochs, lr)
    except KeyboardInterrupt:  # retraining keeps no checkpoints: say that nothing was kept
        raise Interrupted(f"stopped by SIGINT (Ctrl-C) during training; nothing was written to {out}; run the "
                          f"command again to train from the start") from None
    net = net.to(memory_format=torch.contiguous_format).cpu().eval()
    files = export_network(net, os.path.join(out, "network"))
    return {"arch": arch.arch_string(), "source": source.label, "finetune": finetune, "test_acc": final["test_acc"],
            "train_acc": final["train_acc"], "epochs": final["epoch"], "producing_run_id": source.run_id,
            "files": files, "out_dir": out}


def cpu_timing(model: Any) -> tuple[int, str]:
    """Threads and clock a network is timed with here for ``model``'s target: as a CPU profile was timed; for
    another target as ``cpu_local`` times it, so one network gets one figure."""
    md = getattr(model, "metadata", None) or {}
    if md.get("device") == "cpu":
        return int(md.get("threads", 1)), str(md.get("clock", "wall"))
    return 1, quick_settings(1).clock


def measure_retrained(exp: Experiment, fitted: dict[str, Any], measured: dict[str, Any] | None = None,
                      target: HardwareTarget | None = None) -> dict[str, Any]:
    """The measuring half of :func:`run_retrain`: time the exported network on this CPU (unless ``measured``, from
    :func:`measure_latencies_ms` with :func:`cpu_timing`, is given), predict it on the experiment's hardware target
    (``target``, resolved here when None) and write ``result.json``."""
    out = fitted["out_dir"]
    net = load_network(os.path.join(out, "network"))
    arch = net.arch
    model = (target or target_of(exp)).model
    if measured is None:
        threads, clock = cpu_timing(model)
        measured = measure_latency_ms(net, arch, threads=threads, clock=clock)
    predicted = arch_latency(model, arch)[0]
    compare = latency_comparison(model, predicted, measured)
    log(f"[train] latency: predicted {predicted:.3f} ms on {model.name}, measured {measured['median_ms']:.3f} ms "
        f"on this machine's CPU ({measured['threads']} thread(s), median, {measured['clock']} clock)"
        + (f", predicted/measured {compare['latency_ratio']:.2f}" if compare["latency_ratio"] is not None
           else f" ({compare['latency_note']})"))
    result = {k: v for k, v in fitted.items() if k not in ("out_dir", "files", "producing_run_id")}
    result.update({"profile": model.name, "predicted_latency_ms": predicted,
                   "measured_cpu_latency_ms": measured["median_ms"], **compare, "measured": measured,
                   "producing_run_id": fitted["producing_run_id"], "files": fitted["files"]})
    atomic_write_text(os.path.join(out, "result.json"), json.dumps(result, indent=2) + "\n")
    result["out_dir"] = out
    return result


def latency_comparison(model: Any, predicted_ms: float, measured: dict[str, float]) -> dict[str, Any]:
    """``latency_ratio`` (predicted / measured here) where the target is this machine's CPU, else ``None`` and a
    ``latency_note`` saying why the CPU time here says nothing about the target.

    The target is this CPU when it is a measured CPU profile whose fingerprint matches this machine (``cpu_local``
    always does).
    """
    md = getattr(model, "metadata", None) or {}
    name = getattr(model, "name", "?")
    if md.get("device") != "cpu":
        why = (f"{name} is {md.get('device_name', 'a FLOPs count')}: a time measured on this CPU says nothing about "
               f"that target")
    elif md.get("method") != "measured" or machine_note(model) is not None:
        why = f"{name} was not measured on this CPU: the ratio would compare two machines"
    else:
        return {"latency_ratio": predicted_ms / measured["median_ms"], "latency_note": None}
    return {"latency_ratio": None, "latency_note": why}


def _fit_on_ray(exp: Experiment, arch: Arch, state, epochs, lr) -> tuple[ProxylessNet, dict[str, Any]]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig

    d = exp.dist
    connect(exp, num_cpus=os.cpu_count())
    try:
        check_placeable(exp)
        use_gpu = d.gpus_per_worker > 0
        resources = {"CPU": d.cpus_per_worker, **d.resources_per_worker, **({"GPU": d.gpus_per_worker} if use_gpu
                                                                            else {})}
        # Ray Train's own SIGINT handler exits quietly with status 1; this one raises KeyboardInterrupt
        trainer = trainer_class()(
            retrain_fn_per_worker,
            train_loop_config={"experiment": exp.to_dict(), "arch": arch.to_dict(), "state_dict": state,
                               "epochs": epochs, "lr": lr},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=d.workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(name=f"retrain-{exp.name}-{arch.name or 'network'}",
                                           storage_path=storage_path(exp),
                                           failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
                                           callbacks=[EpochLogCallback()],
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        result = trainer.fit()
        if result.error is not None:
            raise_train_error(result.error)
        with result.checkpoint.as_directory() as folder:
            net = load_network(folder)
            with open(os.path.join(folder, "metrics.json")) as fh:
                metrics = json.load(fh)
        return net, metrics
    finally:
        ray.shutdown()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
