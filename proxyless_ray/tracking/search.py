"""Tracking of a single search (``proxyless-ray search``): a parent ``search <name>`` run with one child run.

The drivers (:func:`.distributed.trainer.run_local`, :func:`.ray_trainer.run_ray_search`) use
:class:`SearchTracking` in four steps: ``check()`` before anything is created, ``active()`` around the training
(creates or, on resume, reuses the runs; marks them FAILED or KILLED on an error), per-epoch logging (from the
in-process reporter, or from the Ray Train controller through :class:`.ray_train.MLflowReportCallback`)
and ``finish()`` after the outputs are written (artifacts, registered model, one-row Pareto table on the parent).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from proxyless_ray.config import Experiment
from proxyless_ray.latency.target import HardwareTarget
from proxyless_ray.nn.network import load_network
from proxyless_ray.pareto import pareto_table
from proxyless_ray.plots import plot_pareto
from proxyless_ray.tracking.results import best_summary
from proxyless_ray.tracking.tracker import Tracker, experiment_params, profile_info, search_tags

logger = logging.getLogger(__name__)


class SearchTracking:
    """The MLflow runs of one single search; does nothing when tracking is disabled.

    Args:
        exp: The experiment.
        resume: Reuse the runs of the previous attempt (same output folder) instead of starting new ones.
    """

    def __init__(self, exp: Experiment, resume: bool = False):
        self.exp, self.resume = exp, resume
        self.tracker = Tracker(exp)
        self.key = os.path.abspath(exp.output_dir)
        self.parent_id = self.child_id = ""
        self.target: HardwareTarget | None = None

    def check(self) -> None:
        """Fail fast (unreachable store, deleted experiment name) before any training: :meth:`Tracker.check`."""
        self.tracker.check()

    @contextmanager
    def active(self, target: HardwareTarget | None = None) -> Iterator[SearchTracking]:
        """Create (or reuse) the parent and child runs; an error inside marks both FAILED (KILLED on Ctrl-C).

        ``target`` is the search's resolved hardware target, which names the runs' hardware (read from the
        experiment's spec when None).
        """
        self.target = target
        if not self.tracker.enabled:
            yield self
            return
        t = self.tracker
        t.ensure_experiment()
        self.parent_id = t.start_parent("search", f"search {self.exp.name}", self.exp, self.key, reuse=self.resume)
        tags = search_tags(self.exp, "search", self.key, target)
        self.child_id = t.start_child(self.parent_id, self.key, tags, experiment_params(self.exp), name=self.exp.name,
                                      reuse=self.resume)
        print(f"MLflow: run {self.child_id} (parent {self.parent_id}) in experiment {t.experiment!r} at {t.uri}",
              flush=True)
        try:
            yield self
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            reason = f"{type(err).__name__}: {err}"
            for run_id in (self.child_id, self.parent_id):
                try:
                    t.finish_run(run_id, status, reason)
                except Exception as log_err:  # the training error matters more than the store's
                    logger.warning("MLflow: could not mark run %s %s: %s", run_id, status, log_err)
            raise

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """Log one epoch to the child run (in-process searches)."""
        self.tracker.log_epoch(self.child_id, metrics)

    def callbacks(self) -> list:
        """Ray Train ``UserCallback``s that log each committed epoch to the child run (empty when disabled)."""
        if not self.tracker.enabled:
            return []
        # deferred on purpose: Ray loads for a Ray search only (an in-process search never imports it)
        from proxyless_ray.tracking.ray_train import MLflowReportCallback

        return [MLflowReportCallback(self.tracker, self.child_id)]

    def finish(self, out_dir: str, result: dict[str, Any]) -> None:
        """Upload the outputs, register the derived network, summarise on the parent and close both runs."""
        if not self.tracker.enabled:
            return
        t = self.tracker
        ok = t.finish_child(self.child_id, out_dir, self.exp.latency.profile)
        reason = None
        if ok and t.register_models:
            reason = self._register(out_dir, result)
        elif not ok:
            why = t.client.get_run(self.child_id).data.tags.get("failure_reason")
            reason = f"child run {self.child_id} failed: {why}"
        try:
            self._parent_summary(result)
        except Exception as err:  # the search is done; a summary failure only fails the parent
            reason = f"{reason + '; ' if reason else ''}parent summary failed: {type(err).__name__}: {err}"
        t.finish_run(self.parent_id, "FAILED" if reason else "FINISHED", reason)

    def _register(self, out_dir: str, result: dict[str, Any]) -> str | None:
        acc = result.get("test_acc") if result.get("test_acc") is not None else result.get("heldout_acc")
        try:
            if self.tracker.client.search_model_versions(f"run_id = '{self.child_id}'"):
                return None  # a resumed search that had already registered its network
            folder = os.path.join(out_dir, "network")
            version = self.tracker.register_model(
                self.child_id, load_network(folder), self.hardware, float(acc or 0.0), float(result["latency_ms"]),
                tags={"heldout_acc": result.get("heldout_acc"), "test_acc": result.get("test_acc")}, folder=folder)
        except Exception as err:  # the run and local outputs stay; only the registry entry is missing
            logger.warning("MLflow: registering the derived network failed: %s", err)
            return f"registering the derived network failed: {type(err).__name__}: {err}"
        print(f"MLflow: registered {self.hardware!r} network as version {version}", flush=True)
        return None

    @property
    def hardware(self) -> str:
        return (self.target.info() if self.target is not None else profile_info(self.exp.latency.profile))["hardware"]

    def _parent_summary(self, result: dict[str, Any]) -> None:
        row = {"hardware": self.hardware, "trial_id": self.child_id, "heldout_acc": result.get("heldout_acc"),
               "expected_latency_ms": result.get("expected_latency_ms"), "arch": result.get("arch"),
               "lambda": self.exp.latency.lam if self.exp.latency.loss == "add" else None}
        table = pareto_table([row])
        with tempfile.TemporaryDirectory(prefix="proxyless-pareto-") as tmp:
            plot = plot_pareto(table, os.path.join(tmp, "pareto.png"), title=f"search {self.exp.name}")
            self.tracker.log_parent_summary(self.parent_id, table, plot, summary=best_summary(table))
