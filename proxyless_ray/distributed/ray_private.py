"""Ray's private API, all in one place: what this project reaches below Ray's public surface for, and why.

- Train V2's internal loggers (``ray.train.v2._internal.execution``), which log every report and checkpoint at INFO
  from the workers under names its ``LoggingConfig`` does not reach (:func:`quiet_worker_logs`), and Train V1's
  storage logger that Tune still uses (:data:`TUNE_STORAGE_LOGGER`).
- Two private hooks of Train V2's trainer, overridden (:func:`trainer_class`): ``_register_sigint_handler`` (Ctrl-C
  says where to resume from instead of exiting quietly) and ``_create_default_callbacks`` (a lean embedded cluster
  drops two helper actors by their class names, :data:`DROPPED_CALLBACKS`).
- The environment of a lean embedded cluster (:data:`LEAN_ENV`, Ray's own variables) and this process's record of
  which of them it set (:func:`set_lean_env`, :func:`mark_lean_cluster`).
- Where ``ray start`` records the cluster's address (:func:`recorded_address`) and how this process turns on Ray's
  token authentication (:func:`enable_token_mode`).
- The name of Train V2's run snapshot file (:data:`RAY_SNAPSHOT`), removed to restart a run from an older checkpoint.
- What a Ray session leaves behind in the calling process (:func:`process_state_kept`): Ray's variables in
  ``os.environ``, its cached auth mode and token, and Train's or Tune's Ctrl-C handler.

``tests/distributed/test_ray_private.py`` checks each of these against the installed Ray and names what changed, so a
Ray upgrade that moves one fails there in one clear line instead of somewhere in a search.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

# Train V2's name for it (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Train V1's storage logger, still used by Tune: every checkpoint it persists at INFO
TUNE_STORAGE_LOGGER = "ray.train._internal.storage"
# Train V2's worker-side modules whose loggers report every report and checkpoint at INFO
INTERNAL_LOGGER_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")
# Read by the Train controller when it starts (Train propagates the variable): a laptop is not preempted.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Train V2's default callbacks that a lean cluster leaves out (the second only when the trainer has no datasets).
DROPPED_CALLBACKS = ("PlacementGroupCleanerCallback", "DatasetsCallback")

# Set, unless the user already has, when connect() starts an embedded cluster without the dashboard: nothing reads
# what these produce there.
LEAN_ENV = {
    "RAY_enable_metrics_collection": "0",  # Ray's metrics: no dashboard or Prometheus scrapes them
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Train's controller and worker metrics callbacks, likewise
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",  # the log monitor lists its folder every 0.5 s, not 10x a second
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's node and worker statistics: every minute, not 5 s
}
_LEAN_CLUSTER = False  # connect() started an embedded cluster without the dashboard (so without the State API)
_LEAN_SET: set[str] = set()  # the LEAN_ENV variables connect() set (not the user)


def set_lean_env(lean: bool) -> None:
    """Before an embedded cluster starts: the lean settings the user has not set, or (``lean=False``) Ray's defaults
    back for the ones an earlier lean cluster of this process set."""
    os.environ[PREEMPTION_WATCHER] = "0"
    for key, value in LEAN_ENV.items():
        if lean and key not in os.environ:
            os.environ[key] = value
            _LEAN_SET.add(key)
        elif not lean and key in _LEAN_SET:  # a later cluster with the dashboard gets Ray's defaults back
            os.environ.pop(key, None)
            _LEAN_SET.discard(key)


def mark_lean_cluster(lean: bool) -> None:
    """Record whether this process's cluster is a lean embedded one (read by :func:`trainer_class`)."""
    global _LEAN_CLUSTER
    _LEAN_CLUSTER = lean


def quiet_worker_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO from the workers under loggers that its
    ``LoggingConfig`` does not reach; one line per epoch from rank 0 is enough."""
    context, storage = (importlib.import_module(name) for name in INTERNAL_LOGGER_MODULES)
    for name in (context.__file__, storage.__name__, storage.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)


def trainer_class() -> type[TorchTrainer]:
    """``TorchTrainer``, or on a lean embedded cluster a subclass without two helper actors.

    - The placement-group cleaner: Train V2 starts a detached actor per run that asks the State API every second
      whether the controller is alive, to remove its placement group if the controller dies without cleaning up.
      The State API is served by the dashboard, so without it every query failed and logged a warning (once a
      second on the driver's terminal); and an embedded cluster's placement groups end with the cluster anyway.
    - The dataset manager, when the trainer has no Ray Datasets (the search reads its own shards): an idle actor
      process, beside workers that want every core.
    """
    import ray  # Ray loads with the first trainer, not with this module (the CLI starts without it)
    from ray.train.torch import TorchTrainer

    class InterruptibleTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller):  # Ray 2.60's hook; on a version without it nothing changes
            """Train's own handler aborts the run and exits quietly (status 1, nothing said); this one aborts it
            too, then raises ``KeyboardInterrupt`` so the driver says what happened and where to resume from."""

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops the abort itself
                try:
                    ray.get(controller.abort.remote(), timeout=30)
                except Exception:  # the controller may be gone already (the whole group got the signal)
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    if not _LEAN_CLUSTER:
        return InterruptibleTorchTrainer

    class LeanTorchTrainer(InterruptibleTorchTrainer):
        def _create_default_callbacks(self):  # Ray 2.60's hook; on a version without it nothing changes
            pg_cleaner, datasets = DROPPED_CALLBACKS
            dropped = {pg_cleaner} | (set() if self.datasets else {datasets})
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in dropped]

    return LeanTorchTrainer


def recorded_address() -> str | None:
    """The address ``ray start`` recorded on this machine (``ray.init(address="auto")`` reads the same file)."""
    import ray._private.utils

    return ray._private.utils.read_ray_address()


def enable_token_mode() -> None:
    """Ray's token mode for this process (Ray caches its config at import) and the processes it starts."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()  # read the token again, now that token mode is on


def _ray_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("RAY_") or k in LEAN_ENV}


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Run a Ray session and give the calling process back as it was: for notebooks, which run one call after another.

    A session leaves marks that outlive ``ray.shutdown()``: Ray's variables in ``os.environ`` (its auth mode, the
    lean cluster's settings, ``PREEMPTION_WATCHER``), its auth mode and token cached for the process (a later
    embedded cluster then failed to start its GCS with ``InvalidAuthToken``), and Train's or Tune's Ctrl-C handler
    (a later Ctrl-C first tried to abort a controller that was gone). Nothing is restored when a Ray session is
    still up afterwards (the caller's own, which it keeps using).
    """
    global _LEAN_CLUSTER
    env = _ray_env()
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        ray = sys.modules.get("ray")  # not imported here: a search in this process never loads Ray
        if ray is None or not ray.is_initialized():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signal.SIGINT, handler)
            if _ray_env() != env:
                for key in _ray_env().keys() - env.keys():
                    os.environ.pop(key, None)
                os.environ.update(env)
                _LEAN_SET.intersection_update(env)
                _LEAN_CLUSTER = False
                if ray is not None:
                    _reset_auth_cache()


def _reset_auth_cache() -> None:
    """Ray's auth mode (its config) and token, read again from the environment, as Ray's own tests reset them."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # first: a draining gRPC thread must not reload the token while the config says token mode
    AuthenticationTokenLoader.instance().reset_cache()
