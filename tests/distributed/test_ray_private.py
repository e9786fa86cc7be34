"""Ray's private API that ``proxyless_ray.distributed.ray_private`` relies on, checked against the installed Ray.

Each test names what changed, so a Ray upgrade that moves one of these fails here in one line (and not somewhere in a
search); the fix goes into ``proxyless_ray/distributed/ray_private.py`` alone.
"""

from __future__ import annotations

import importlib
import inspect

import ray
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from proxyless_ray.distributed import ray_private

WHERE = "update proxyless_ray/distributed/ray_private.py"


def test_the_internal_logger_modules_exist():
    for name in ray_private.INTERNAL_LOGGER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise AssertionError(f"Ray {ray.__version__} has no module {name} ({err}): quiet_worker_logs silences "
                                 f"its logger; {WHERE}") from None


def test_the_train_hooks_we_override_still_exist():
    run = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert "self._register_sigint_handler(" in run, (
        f"Ray {ray.__version__}'s DataParallelTrainer no longer calls _register_sigint_handler: Ctrl-C would exit "
        f"quietly instead of saying where to resume from; {WHERE}")
    assert callable(getattr(DataParallelTrainer, "_create_default_callbacks", None)), (
        f"Ray {ray.__version__}'s DataParallelTrainer has no _create_default_callbacks: a lean cluster would start "
        f"the placement-group cleaner again; {WHERE}")


def test_the_callbacks_a_lean_cluster_drops_are_train_defaults():
    defaults = inspect.getsource(DataParallelTrainer._create_default_callbacks)
    for name in ray_private.DROPPED_CALLBACKS:
        assert f"{name}(" in defaults, (
            f"Ray {ray.__version__}'s default Train callbacks no longer include {name}: the lean trainer drops it by "
            f"class name; {WHERE}")


def test_the_run_snapshot_name_is_rays():
    """distributed.resume removes Ray's run snapshot to restart a run from an older checkpoint."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    except ImportError as err:
        raise AssertionError(f"Ray {ray.__version__} moved CHECKPOINT_MANAGER_SNAPSHOT_FILENAME ({err}); {WHERE}") \
            from None
    assert ray_private.RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, (
        f"Ray {ray.__version__} names its run snapshot {CHECKPOINT_MANAGER_SNAPSHOT_FILENAME!r}, not "
        f"{ray_private.RAY_SNAPSHOT!r}; {WHERE}")


def test_the_lean_trainer_subclasses_the_public_trainer():
    from ray.train.torch import TorchTrainer

    for lean in (False, True):
        ray_private.mark_lean_cluster(lean)
        try:
            assert issubclass(ray_private.trainer_class(), TorchTrainer)
        finally:
            ray_private.mark_lean_cluster(False)


def test_the_cluster_helpers_exist():
    """distributed.cluster reads the address ``ray start`` recorded and turns on token authentication."""
    try:
        import ray._private.utils
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError as err:
        raise AssertionError(f"Ray {ray.__version__} moved a cluster helper ({err}); {WHERE}") from None
    assert callable(getattr(ray._private.utils, "read_ray_address", None)), (
        f"Ray {ray.__version__} has no ray._private.utils.read_ray_address; {WHERE}")
    assert callable(_enable_token_auth)
    assert callable(getattr(AuthenticationTokenLoader, "instance", None)), (
        f"Ray {ray.__version__}'s AuthenticationTokenLoader has no instance(); {WHERE}")
    assert callable(getattr(Config, "initialize", None)), (
        f"Ray {ray.__version__}'s ray._raylet.Config has no initialize() (process_state_kept resets it); {WHERE}")


def test_process_state_kept_restores_what_a_session_leaves(monkeypatch):
    """What a Ray session sets in this process (Ray's variables, the lean cluster's record, a Ctrl-C handler) is put
    back when no session is left; a variable the caller had keeps its value."""
    import os
    import signal

    monkeypatch.setenv("RAY_CALLER_SETTING", "kept")
    before = {k: v for k, v in os.environ.items() if k.startswith("RAY_") or k in ray_private.LEAN_ENV}
    handler = signal.getsignal(signal.SIGINT)
    with ray_private.process_state_kept():
        ray_private.set_lean_env(lean=True)
        ray_private.mark_lean_cluster(True)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_CALLER_SETTING"] = "changed"
        signal.signal(signal.SIGINT, lambda signum, frame: None)
    assert signal.getsignal(signal.SIGINT) is handler
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY_") or k in ray_private.LEAN_ENV} == before
    assert not ray_private._LEAN_CLUSTER and not ray_private._LEAN_SET - before.keys()
