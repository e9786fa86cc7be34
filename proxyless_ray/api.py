"""The public Python API: what the command line does, as typed calls with dataclass results (for notebooks).

    import proxyless_ray as pr

    exp = pr.load_experiment("experiments/fashion_mnist.yaml", ["train.epochs=2"])
    found = pr.run_search(exp)                      # SearchResult: derived arch, accuracies, latency per hardware
    found.arch, found.test_acc, found.latency_on_profiles, found.out_dir, found.mlflow_run_id
    pr.predict_latency(found.arch_file, "pixel1")
    net = pr.retrain(exp, found.arch_file, finetune=True, epochs=1)   # RetrainResult
    front = pr.run_sweep(exp)                       # SweepResult: Pareto table, best per hardware, MLflow run ids

The command line (``proxyless-ray search``, ``sweep``, ``train``) runs the same functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from proxyless_ray.config import Experiment, load_experiment
from proxyless_ray.distributed import trainer
from proxyless_ray.distributed.ray_private import process_state_kept
from proxyless_ray.distributed.retrain import run_retrain
from proxyless_ray.latency.model import arch_latency, load_latency_model
from proxyless_ray.nn.arch import Arch
from proxyless_ray.sweeps.plan import load_plan
from proxyless_ray.tracking.retrain import log_retrain
from proxyless_ray.tracking.tracker import Tracker

__all__ = ["Experiment", "RetrainResult", "SearchResult", "SweepResult", "load_experiment", "predict_latency",
           "retrain", "run_search", "run_sweep"]


@dataclass(frozen=True)
class SearchResult:
    """A finished search (``<out_dir>/result.json``, read as fields).

    Attributes:
        name: The experiment's name.
        arch: The derived architecture as block strings (zero layers left out).
        profile: The latency target the search optimised for.
        latency_ms: The derived network's latency on that target.
        latency_on_profiles: Its latency on every shipped hardware profile, by name.
        test_acc: Test top-1 of the exported network (after the optional fine-tune).
        heldout_acc: Held-out accuracy the architecture steps saw last.
        inherited_test_acc: Test top-1 with the supernet's weights, before any fine-tune.
        out_dir: The output folder; ``files`` names the files in it.
        mlflow_run_id: The search's MLflow child run (None without tracking).
        raw: ``result.json`` as written.
    """

    name: str
    arch: str
    profile: str
    latency_ms: float
    latency_on_profiles: dict[str, float]
    test_acc: float | None
    heldout_acc: float | None
    inherited_test_acc: float | None
    out_dir: str
    files: dict[str, str]
    mlflow_run_id: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def arch_file(self) -> str:
        """``arch.json`` of the derived network (what :func:`retrain` and :func:`predict_latency` take)."""
        return self.files["arch"]


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep's report (``<out_dir>/summary.json`` and the Pareto table).

    Attributes:
        name: The experiment's name.
        trials, finished: Trials in the grid, and those that ran to the end.
        best: Per hardware, the best network per latency target.
        hypervolume: Per hardware, the front's hypervolume.
        table: The Pareto table (one row per trial: hardware, coefficient, accuracy, latency, arch, front flag).
        files: Report files (``table_parquet``, ``table_csv``, ``plot``).
        mlflow_parent_run_id: The sweep's MLflow parent run (None without tracking).
        mlflow_run_ids: Per trial (its ``trial_id`` in ``table``), its MLflow child run, as the store holds them.
        raw: ``summary.json`` as written.
    """

    name: str
    trials: int
    finished: int
    best: dict[str, Any]
    hypervolume: dict[str, float]
    table: Any = field(repr=False)  # a pandas DataFrame
    files: dict[str, str] = field(default_factory=dict)
    mlflow_parent_run_id: str | None = None
    mlflow_run_ids: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RetrainResult:
    """A retrained network, measured on this machine.

    Attributes:
        arch: The network's block strings.
        test_acc: Test top-1 after retraining.
        predicted_latency_ms: Latency on the experiment's target profile.
        measured_cpu_latency_ms: Median forward latency measured here.
        out_dir: Where the network was exported.
        mlflow_run_id: The retraining's MLflow run ("" without tracking).
        raw: ``result.json`` as written.
    """

    arch: str
    test_acc: float
    predicted_latency_ms: float | None
    measured_cpu_latency_ms: float | None
    out_dir: str
    mlflow_run_id: str
    raw: dict[str, Any] = field(repr=False)


def run_search(exp: Experiment, resume: bool = False) -> SearchResult:
    """Run a search the way the experiment asks (in this process for ``dist.workers == 0``, else Ray Train).

    Args:
        exp: From :func:`load_experiment`.
        resume: Continue a stopped search from its newest intact checkpoint.
    """
    with process_state_kept():
        r = trainer.run_search(exp, resume=resume)
    run_id = None
    if exp.tracking.enabled:
        run_id = Tracker(exp).find_trial_run(os.path.abspath(exp.output_dir))
    return SearchResult(name=r["name"], arch=r["arch"], profile=r["profile"], latency_ms=r["latency_ms"],
                        latency_on_profiles=dict(r.get("latency_on_profiles") or {}), test_acc=r.get("test_acc"),
                        heldout_acc=r.get("heldout_acc"), inherited_test_acc=r.get("inherited_test_acc"),
                        out_dir=exp.output_dir, files=dict(r["files"]), mlflow_run_id=run_id, raw=r)


def run_sweep(exp: Experiment, resume: bool = False) -> SweepResult:
    """Run the experiment's sweep (hardware x latency coefficients) on Ray Tune and read its report back.

    MLflow tracking follows ``exp.tracking`` (the store is checked before anything starts).
    """
    import pandas as pd

    # deferred on purpose: Ray Tune loads for a sweep only (a search in this process never imports it)
    from proxyless_ray.sweeps.sweep import run_sweep as run_tune_sweep

    tracker = None
    if exp.tracking.enabled:
        tracker = Tracker(exp)
        tracker.check()
    with process_state_kept():
        s = run_tune_sweep(exp, resume=resume, tracker=tracker)
    table = pd.read_parquet(s["files"]["table_parquet"])
    parent, runs = None, {}
    if tracker is not None:
        # what the sweep logged: the parent it saved in its plan (sweep.json), the children the store holds under it
        parent = load_plan(os.path.abspath(exp.output_dir)).parent_run_id or None
        runs = tracker.child_runs(parent) if parent else {}
    return SweepResult(name=s["name"], trials=s["trials"], finished=s["finished"], best=s["best"],
                       hypervolume=s["hypervolume"], table=table, files=dict(s["files"]),
                       mlflow_parent_run_id=parent, mlflow_run_ids=runs, raw=s)


def retrain(exp: Experiment, arch: str | os.PathLike, finetune: bool = False, epochs: int | None = None,
            lr: float | None = None) -> RetrainResult:
    """Retrain a network on the experiment's data, export it and measure it on this machine.

    Args:
        exp: The experiment (data, training recipe, latency target).
        arch: ``arch.json``, a network folder, ``runs:/<id>`` or ``models:/<name>/<version>``.
        finetune: Start from the weights that come with the architecture.
        epochs: Training epochs (default ``train.epochs``).
        lr: Peak learning rate (default ``train.lr``).
    """
    with process_state_kept():
        r = run_retrain(exp, os.fspath(arch), finetune=finetune, epochs=epochs, lr=lr)
    run_id = log_retrain(Tracker(exp), r) if exp.tracking.enabled else ""
    return RetrainResult(arch=r["arch"], test_acc=r["test_acc"], predicted_latency_ms=r.get("predicted_latency_ms"),
                         measured_cpu_latency_ms=r.get("measured_cpu_latency_ms"), out_dir=r["out_dir"],
                         mlflow_run_id=run_id, raw=r)


def predict_latency(arch: Arch | str | os.PathLike, profile: str = "flops") -> float:
    """Predicted end-to-end latency in ms of a network on a hardware profile.

    Args:
        arch: An :class:`~proxyless_ray.nn.arch.Arch` or the path of an ``arch.json``.
        profile: ``flops``, a profile name in ``hardware_profiles/``, a profile path, or ``cpu_local``.
    """
    net = arch if isinstance(arch, Arch) else Arch.load(arch)
    return float(arch_latency(load_latency_model(profile), net.without_zeros())[0])
