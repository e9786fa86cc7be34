"""Model registry: derived networks as versions of ``proxyless-<hardware>``, and loading them back.

Nothing loaded from the registry is unpickled: a model file can come from anyone who can write to the store, and a
pickle runs code when it is loaded. A network is logged as an MLflow model whose files are the exported network
(``arch.json``, ``state_dict.pt``, and the ``torch.export`` program ``model.pt2``), and loaded back here from the
first two alone: the architecture from JSON, the weights with ``torch.load(weights_only=True)``. The files are logged
as they are, without MLflow's ``pytorch`` flavor: its ``pt2`` format would export the network a second time (seconds
per model) and its ``pickle`` format is what must never be loaded. ``mlflow.pytorch.load_model`` therefore
does not apply; ``torch.export.load`` reads ``model.pt2`` outside this project.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from proxyless_ray.nn.network import PROGRAM_FILE, export_network, load_network

MODEL_PREFIX = "proxyless-"
MODEL_FORMAT = "proxyless_ray network: arch.json + state_dict.pt (weights only) + model.pt2 (torch.export)"


def registered_name(hardware: str) -> str:
    """``proxyless-<hardware>``, with characters MLflow names dislike replaced by ``-``."""
    return MODEL_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", hardware).strip("-")


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``, ``load_model``) at ``uri`` for a moment, then put everything back.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which would leak into later resolution.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def register_network(uri: str, run_id: str, net: nn.Module, hardware: str, acc: float, latency_ms: float,
                     tags: dict[str, Any] | None = None, folder: str | None = None) -> int:
    """Log ``net`` as a model of the run and register it as a new version of ``proxyless-<hardware>``.

    The model's files are the exported network (:func:`proxyless_ray.nn.network.export_network`): ``arch.json``,
    ``state_dict.pt`` and the ``torch.export`` program ``model.pt2``.

    Args:
        uri: Tracking (and registry) URI.
        run_id: The run that produced the network (a child run).
        net: A :class:`proxyless_ray.nn.network.ProxylessNet`.
        hardware: Profile name; names the registered model.
        acc: Accuracy to tag the version with (``acc``), e.g. held-out or test accuracy.
        latency_ms: Predicted latency on ``hardware`` (``latency_ms`` tag).
        tags: Extra version tags.
        folder: ``net`` already exported there (a search's ``network/``); else, or when that folder has no
            ``model.pt2`` (a sweep trial's), it is exported whole to a temp folder.

    Returns:
        The version number (an int, whichever store: sqlite gives ints, the REST API strings).
    """
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    name = registered_name(hardware)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tmp = tempfile.mkdtemp(prefix="proxyless-model-")
    try:
        if folder is None or not os.path.isfile(os.path.join(folder, PROGRAM_FILE)):
            folder = os.path.join(tmp, "network")
            export_network(net.eval(), folder)
        # The model belongs to the run's experiment, so its files go beside the store like the run's (mlflow's
        # log_model would file it under the default experiment, whose artifacts go to ./mlruns of whatever folder
        # the store was created from).
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                            source_run_id=run_id, tags={"format": MODEL_FORMAT})
        client.log_model_artifacts(logged.model_id, folder)
        with _fluent_uri(uri):  # the registry looks the logged model up through the fluent API
            try:
                client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id,
                                             model_id=logged.model_id)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version = int(mv.version)
    version_tags = {"acc": f"{acc:.6g}", "latency_ms": f"{latency_ms:.6g}", "run_id": run_id, "hardware": hardware,
                    "arch": net.arch.arch_string(), **{k: str(v) for k, v in (tags or {}).items()}}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return version


def load_registered(uri: str, model_uri: str) -> nn.Module:
    """Load a registered network (``models:/proxyless-pixel1/3``, ``runs:/<id>/model``...) in eval mode.

    The network is rebuilt from the model's ``arch.json`` and its weights-only ``state_dict.pt``; nothing is
    unpickled.

    Args:
        uri: Tracking (and registry) URI.
        model_uri: Any MLflow model URI.

    Raises:
        ValueError: naming the URI or the file: the model has no ``arch.json`` / ``state_dict.pt`` (a model logged
            in pickle format, which is never loaded), or its weights file holds anything but tensors.
    """
    import mlflow.artifacts

    folder = tempfile.mkdtemp(prefix="proxyless-model-")
    try:
        with _fluent_uri(uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder, tracking_uri=uri)
        files = network_files(local)
        if files is None:
            raise ValueError(f"model {model_uri} has no arch.json and state_dict.pt (a model logged in pickle format "
                             f"is never loaded: unpickling can run code); register it again with this version")
        return load_network(files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def network_files(folder: str) -> str | None:
    """The folder holding ``arch.json`` + ``state_dict.pt`` in a downloaded model or network, else None."""
    for candidate in (folder, os.path.join(folder, "network")):
        if os.path.isfile(os.path.join(candidate, "arch.json")) and os.path.isfile(
                os.path.join(candidate, "state_dict.pt")):
            return candidate
    return None


def model_versions(uri: str, hardware: str) -> list[Any]:
    """Registered versions of ``proxyless-<hardware>`` (``ModelVersion`` objects, newest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name = '{registered_name(hardware)}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)
