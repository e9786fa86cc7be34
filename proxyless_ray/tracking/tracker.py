"""MLflow tracking of searches and sweeps: the driver-side :class:`Tracker`, and the tags and params of a run.

Run structure: one parent run per sweep (or per single search), one child run per trial, linked by the
``mlflow.parentRunId`` tag. The parent id travels to trials through their config, never through MLflow's
current-run context (which does not cross processes). Only driver processes write (the Tune driver, the Ray Train
controller through :class:`proxyless_ray.tracking.ray_train.MLflowReportCallback`, or the in-process search); workers
never touch the store, so nodes without the sqlite file need nothing. Runs are found again by a key tag
(``run_key`` for parents, ``trial_key`` for children), so a resumed sweep or search reuses its runs instead of
duplicating them, and epochs already logged are not logged twice.

Tags on every run: ``role`` (parent | child) and ``kind`` (parents: sweep | search; children: trial | search).
Beside this module: the store URI and fail-fast check (:mod:`.tracking_store`), a child run's files and pictures
(:mod:`.tracking_artifacts`), registered models (:mod:`.tracking_registry`), the Pareto table read back from MLflow
(:mod:`.tracking_results`) and the single-search integration (:mod:`.tracking_search`, :mod:`.tracking_ray`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from proxyless_ray.config import Experiment
from proxyless_ray.tracking.store import (
    DEFAULT_DB,
    TrackingUnavailable,
    check_reachable,
    local_artifact_root,
    resolve_uri,
    sqlite_path,
)
from proxyless_ray.tracking.tags import (
    MAX_TAG_LEN,
    experiment_params,
    profile_info,
    quoted,
    search_tags,
    text_value,
)

logger = logging.getLogger(__name__)

BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch
STRING_TAGS = {"arch": "current_arch", "phase": "phase", "derived_arch": "derived_arch"}  # string metrics -> tags
# boolean metrics -> "true"/"false" tags: whether alpha started to learn on a supernet that could rank candidates
BOOL_TAGS = {"supernet_ready": "supernet_ready"}
SKIP_METRICS = ("rank", "pid")
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


# -- the tracker -------------------------------------------------------------------------------------------------


class Tracker:
    """Driver-side MLflow writer for one experiment's tracking settings.

    With tracking disabled every method does nothing (run ids are ``""``), so call sites need no ``if``. The client
    is created lazily and dropped when pickled.

    Args:
        exp: The experiment; only its ``tracking`` section is kept.
    """

    def __init__(self, exp: Experiment):
        cfg = exp.tracking
        self.enabled = cfg.enabled
        self.experiment = cfg.experiment
        self.max_artifact_mb = cfg.max_artifact_mb
        self.register_models = cfg.register_models
        self.uri = resolve_uri(cfg) if cfg.enabled else ""
        self._client = None
        self._experiment_id: str | None = None
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        """The ``MlflowClient`` of this store (tracking and registry)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def check(self, timeout_s: float = 5.0) -> None:
        """Fail fast before any training: :func:`check_reachable`, then :meth:`ensure_experiment` (which also
        creates a fresh sqlite database once, here on the driver, before any other process touches it).

        No-op when disabled.

        Raises:
            TrackingUnavailable: the store cannot be reached or written.
            ValueError: the experiment name belongs to a deleted experiment.
        """
        if self.enabled:
            check_reachable(self.uri, timeout_s)
            self.ensure_experiment()

    def ensure_experiment(self) -> str:
        """Create the experiment if needed and return its id.

        A local store gets an explicit absolute artifact location (``<folder of the db>/mlruns``) because Ray
        changes working folders; a server gets none (it proxies artifacts).

        Raises:
            ValueError: the name belongs to a deleted experiment (MLflow keeps the name until it is purged); the
                message gives the commands that fix it.
        """
        if not self.enabled:
            return ""
        if self._experiment_id is not None:
            return self._experiment_id
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            n = found.experiment_id
            raise ValueError(
                f"MLflow experiment {self.experiment!r} (id {n}) in {self.uri} was deleted, and MLflow keeps a deleted "
                f"experiment's name. Either restore it: MLFLOW_TRACKING_URI={self.uri} mlflow experiments restore "
                f"--experiment-id {n}; or delete it permanently: mlflow gc --backend-store-uri {self.uri} "
                f"--experiment-ids {n}; or choose another name with --set tracking.experiment=NAME")
        if found is not None:
            self._experiment_id = found.experiment_id
            if found.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag, or by MLflow itself
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return self._experiment_id
        root = local_artifact_root(self.uri)
        location = Path(root).as_uri() if root else None
        from mlflow.exceptions import MlflowException

        try:
            # the UI lists a "model training" experiment in its Model training view (see tracking_store.UI_VIEW_QUERY)
            self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location,
                                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another driver created it a moment ago
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            self._experiment_id = found.experiment_id
        return self._experiment_id

    # -- runs ----------------------------------------------------------------------------------------------------

    def _find(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.ensure_experiment()], filter_string,
                                            order_by=["attributes.start_time DESC"], max_results=50))

    def _reuse_or_create(self, key_filter: str, reuse: bool, tags: dict[str, str], params: dict[str, str],
                         run_name: str) -> str:
        existing = self._find(key_filter)
        if reuse and existing:
            run = existing[0]
            run_id = run.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if "failure_reason" in run.data.tags:
                self.client.delete_tag(run_id, "failure_reason")
            new = {k: v for k, v in params.items() if k not in run.data.params}
            changed = sorted(k for k, v in params.items() if k in run.data.params and run.data.params[k] != v)
            if changed:
                logger.warning("run %s resumed with changed params %s; MLflow keeps the first values", run_id, changed)
            self.log_batch(run_id, params=new, tags=tags)
            return run_id
        for run in existing:  # a fresh start supersedes an unfinished run with the same key
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
        run_id = self.client.create_run(self.ensure_experiment(), tags=tags, run_name=run_name).info.run_id
        self.log_batch(run_id, params=params)
        self._last_step[run_id] = -1
        return run_id

    def start_parent(self, kind: str, name: str, exp: Experiment, run_key: str, reuse: bool = True) -> str:
        """The parent run of a sweep or single search, reused when one with the same ``run_key`` exists.

        Args:
            kind: ``sweep`` or ``search``.
            name: Run name shown in the UI (e.g. ``sweep pixel1-lambdas``).
            exp: The (base) experiment; its flattened config becomes the run's params.
            run_key: Stable identity across restarts, e.g. the sweep's or search's absolute output folder.
            reuse: Reuse a run with this key (resume); False starts a new run and marks unfinished old ones KILLED.

        Returns:
            The run id (``""`` when tracking is disabled).
        """
        if not self.enabled:
            return ""
        if kind not in ("sweep", "search"):
            raise ValueError(f"parent kind must be 'sweep' or 'search', got {kind!r}")
        tags = {"role": "parent", "kind": kind, "run_key": run_key, "name": exp.name}
        return self._reuse_or_create(f"tags.role = 'parent' and tags.run_key = {quoted(run_key)}", reuse, tags,
                                     experiment_params(exp), name)

    def start_child(self, parent_id: str, trial_key: str, tags: dict[str, str], params: dict[str, str],
                    name: str | None = None, reuse: bool = True) -> str:
        """The child run of one trial under ``parent_id``, reused when one with the same ``trial_key`` exists.

        Args:
            parent_id: The parent's run id (passed to trials through their config).
            trial_key: Stable identity of the trial under that parent (a Tune trial id, or the output folder).
            tags: Usually :func:`search_tags`; ``role``, ``trial_key`` and ``mlflow.parentRunId`` are added.
            params: Usually :func:`experiment_params` of the trial's experiment.
            name: Run name (default: ``trial_key``).
            reuse: Reuse a run with this key under this parent.

        Returns:
            The run id (``""`` when tracking is disabled).
        """
        if not self.enabled:
            return ""
        tags = {k: text_value(v, MAX_TAG_LEN) for k, v in tags.items()}
        tags.update({"role": "child", "trial_key": trial_key, "mlflow.parentRunId": parent_id})
        tags.setdefault("kind", "trial")
        where = f"tags.mlflow.parentRunId = '{parent_id}' and tags.trial_key = {quoted(trial_key)}"
        return self._reuse_or_create(where, reuse, tags, params, name or trial_key)

    def find_child(self, parent_id: str, trial_key: str) -> str | None:
        """The run id of the child with ``trial_key`` under ``parent_id`` (newest), or None."""
        if not self.enabled or not parent_id:
            return None
        runs = self._find(f"tags.mlflow.parentRunId = '{parent_id}' and tags.trial_key = {quoted(trial_key)}")
        return runs[0].info.run_id if runs else None

    def child_runs(self, parent_id: str) -> dict[str, str]:
        """``{trial_key: run id}`` of every child under ``parent_id`` (the newest run per key), as the store holds
        them; ``{}`` when tracking is disabled."""
        if not self.enabled or not parent_id:
            return {}
        out: dict[str, str] = {}
        token = None
        while True:  # a sweep may have more children than one page holds
            page = self.client.search_runs([self.ensure_experiment()], f"tags.mlflow.parentRunId = '{parent_id}'",
                                           order_by=["attributes.start_time DESC"], max_results=1000,
                                           page_token=token)
            for run in page:
                key = run.data.tags.get("trial_key")
                if key is not None:
                    out.setdefault(key, run.info.run_id)
            token = page.token
            if not token:
                return out

    def find_trial_run(self, trial_key: str) -> str | None:
        """The newest child run with ``trial_key`` under any parent (e.g. a sweep trial's key), or None."""
        if not self.enabled:
            return None
        runs = self._find(f"tags.role = 'child' and tags.trial_key = {quoted(trial_key)}")
        return runs[0].info.run_id if runs else None

    def log_epoch(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log one epoch's numeric metrics in one batch; ``arch``/``phase``/``derived_arch`` become tags.

        Epochs at or below the last step already in the run are skipped, so a resumed search or a restarted worker
        never duplicates a point. A failing store only warns: a long search is not stopped by a logging hiccup.
        """
        if not self.enabled or not run_id:
            return
        step = int(metrics.get("epoch", 0) if step is None else step)
        try:
            if run_id not in self._last_step:
                history = self.client.get_metric_history(run_id, "epoch")
                self._last_step[run_id] = max((m.step for m in history), default=-1)
            if step <= self._last_step[run_id]:
                return
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool) and k not in SKIP_METRICS}
            tags = {STRING_TAGS[k]: text_value(v, MAX_TAG_LEN) for k, v in metrics.items()
                    if k in STRING_TAGS and isinstance(v, str)}
            tags.update({BOOL_TAGS[k]: str(v).lower() for k, v in metrics.items()
                         if k in BOOL_TAGS and isinstance(v, bool)})
            self.log_batch(run_id, metrics=numeric, tags=tags, step=step)
            self._last_step[run_id] = step
        except Exception as err:  # MLflow raises many types; training must go on
            logger.warning("MLflow: logging epoch %s of run %s to %s failed: %s", step, run_id, self.uri, err)

    def log_batch(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Log metrics (at ``step``), params and tags in as few ``log_batch`` calls as MLflow's limits allow."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ts = [RunTag(k, v) for k, v in (tags or {}).items()]
        # MLflow's limits per call: 1000 entries, 100 params, 100 tags
        chunks = max(math.ceil(len(ms) / 800), math.ceil(len(ps) / BATCH), math.ceil(len(ts) / BATCH))
        for i in range(chunks):
            self.client.log_batch(run_id, metrics=ms[i * 800:(i + 1) * 800], params=ps[i * BATCH:(i + 1) * BATCH],
                                  tags=ts[i * BATCH:(i + 1) * BATCH])

    def finish_run(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        """Terminate a run; a ``reason`` goes to the ``failure_reason`` tag (FAILED/KILLED runs)."""
        if not self.enabled or not run_id:
            return
        if reason:
            self.client.set_tag(run_id, "failure_reason", text_value(reason, MAX_TAG_LEN))
        self.client.set_terminated(run_id, status)

    def finish_child(self, run_id: str, out_dir: str, profile_name: str | None = None,
                     status: str = "FINISHED") -> bool:
        """Upload a finished search's output folder to its child run and terminate the run.

        Logs ``arch.json``, ``searched_arch.json``, ``result.json``, ``metrics.jsonl``, ``alphas.json``,
        ``network/``, the pictures rendered into ``<out_dir>/plots/`` (architecture with zero layers as gaps, alpha
        heatmap and evolution, latency breakdown) and the hardware profile file; final tags (``derived_arch``...) and
        metrics (the derived network's latency on the target and on every shipped profile).

        An artifact over ``tracking.max_artifact_mb`` or a failed upload marks the run FAILED with a
        ``failure_reason`` tag and returns False; nothing raises and the local folder keeps every file.

        Args:
            run_id: The child run.
            out_dir: The search's output folder (:func:`proxyless_ray.search.results.write_search_outputs`).
            profile_name: Profile whose file to attach (default: ``result.json``'s); ``flops`` has none.
            status: Final status when everything went up.

        Returns:
            True when the run finished with ``status``.
        """
        if not self.enabled or not run_id:
            return True
        # deferred on purpose (here and below): matplotlib and torch load when a run gets files, not with the CLI
        from proxyless_ray.tracking.artifacts import final_metrics, final_tags, upload_search_outputs

        result, reasons = upload_search_outputs(self.client, run_id, out_dir, profile_name, self.max_artifact_mb)
        try:
            self.log_batch(run_id, metrics=final_metrics(result), tags=final_tags(result),
                            step=int(result.get("epochs", 0)))
        except Exception as err:  # a failed store call fails the run, not the driver
            reasons.append(f"logging the final tags and metrics failed: {type(err).__name__}: {err}")
        if reasons:
            reason = "; ".join(reasons)
            logger.warning("MLflow run %s marked FAILED: %s (local outputs in %s are complete)", run_id, reason,
                           out_dir)
            self.finish_run(run_id, "FAILED", reason)
            return False
        self.finish_run(run_id, status)
        return True

    # -- parent summary and registry -----------------------------------------------------------------------------

    def log_parent_summary(self, parent_id: str, table, plot_path: str | None = None,
                           summary: dict[str, Any] | None = None) -> None:
        """Attach the Pareto table (Parquet + CSV), its plot and a best-network summary to the parent run.

        Args:
            parent_id: The parent run.
            table: A :func:`proxyless_ray.pareto.pareto_table` DataFrame.
            plot_path: A PNG from :func:`proxyless_ray.plots.plot_pareto`, or None.
            summary: JSON-safe dict, e.g. :func:`proxyless_ray.tracking.results.best_summary`.
        """
        if not self.enabled or not parent_id:
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="proxyless-pareto-") as tmp:
            table.to_parquet(os.path.join(tmp, "pareto.parquet"), index=False)
            table.to_csv(os.path.join(tmp, "pareto.csv"), index=False)
            if summary is not None:
                with open(os.path.join(tmp, "summary.json"), "w") as fh:
                    json.dump(summary, fh, indent=2, default=str)
            self.client.log_artifacts(parent_id, tmp, "pareto")
        if plot_path is not None:
            self.client.log_artifact(parent_id, plot_path, "pareto")

    def register_model(self, run_id: str, net, hardware: str, acc: float, latency_ms: float,
                       tags: dict[str, Any] | None = None, folder: str | None = None) -> int | None:
        """Log ``net`` (already exported in ``folder``, if given) to ``run_id``; register it as ``proxyless-<hw>``.

        See :func:`proxyless_ray.tracking.registry.register_network`. Returns None when tracking is disabled.
        """
        if not self.enabled or not run_id:
            return None
        from proxyless_ray.tracking.registry import register_network

        return register_network(self.uri, run_id, net, hardware, acc, latency_ms, tags, folder)

    def load_registered(self, model_uri: str):
        """Load a registered network back, e.g. ``models:/proxyless-pixel1/3``, as an ``nn.Module`` in eval mode."""
        from proxyless_ray.tracking.registry import load_registered

        return load_registered(self.uri, model_uri)


__all__ = ["DEFAULT_DB", "Tracker", "TrackingUnavailable", "check_reachable", "experiment_params",
           "local_artifact_root", "profile_info", "resolve_uri", "search_tags", "sqlite_path"]
