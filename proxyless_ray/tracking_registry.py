"""Model registry: derived networks as versions of ``proxyless-<hardware>``, and loading them back.

Nothing loaded from the registry is unpickled: a model file can come from anyone who can write to the store, and a
pickle runs code when it is loaded. A network is logged with ``mlflow.pytorch.log_model`` in MLflow's ``pt2`` format
(a ``torch.export`` program; a derived network has no Python control flow to freeze, unlike the supernet) with
``arch.json`` and ``state_dict.pt`` as extra files, and is loaded back here from those two alone: the architecture
from JSON, the weights with ``torch.load(weights_only=True)``; ``mlflow.pytorch.load_model`` is never called (it gives
a graph without the architecture). Pip requirements are given, because inferring them costs 5-15 s per model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

MODEL_PREFIX = "proxyless-"
EXTRA_DIR = "extra_files"  # where log_model puts extra files inside the model's artifacts


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


def input_example(net: nn.Module) -> np.ndarray:
    """One float32 image of the shape ``net`` takes (``(1, C, H, W)`` from its ``arch``)."""
    arch = net.arch
    return np.zeros((1, arch.in_chs, arch.resolution, arch.resolution), dtype=np.float32)


def register_network(uri: str, run_id: str, net: nn.Module, hardware: str, acc: float, latency_ms: float,
                     tags: dict[str, Any] | None = None) -> int:
    """Log ``net`` to the run (artifact ``model``) and register it as a new version of ``proxyless-<hardware>``.

    Args:
        uri: Tracking (and registry) URI.
        run_id: The run that produced the network (a child run).
        net: A :class:`proxyless_ray.network.ProxylessNet`.
        hardware: Profile name; names the registered model.
        acc: Accuracy to tag the version with (``acc``), e.g. held-out or test accuracy.
        latency_ms: Predicted latency on ``hardware`` (``latency_ms`` tag).
        tags: Extra version tags.

    Returns:
        The version number (an int, whichever store: sqlite gives ints, the REST API strings).
    """
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    net = net.eval()
    example = input_example(net)
    with torch.no_grad():
        output = net(torch.from_numpy(example)).numpy()
    name = registered_name(hardware)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # The logged model belongs to the run's experiment, so its files go beside the store like the run's. Left to
    # itself, log_model files it under the fluent API's default experiment, whose artifact root is ./mlruns of
    # whatever folder the store was created from.
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                        source_run_id=run_id)
    folder = tempfile.mkdtemp(prefix="proxyless-model-")
    try:
        net.arch.save(os.path.join(folder, "arch.json"))
        torch.save(net.state_dict(), os.path.join(folder, "state_dict.pt"))
        with _fluent_uri(uri):
            info = mlflow.pytorch.log_model(
                net, name="model", run_id=run_id, model_id=logged.model_id, serialization_format="pt2",
                extra_files=[os.path.join(folder, "arch.json"), os.path.join(folder, "state_dict.pt")],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], input_example=example,
                signature=infer_signature(example, output), registered_model_name=name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    version = int(info.registered_model_version)
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

    from proxyless_ray.network import load_network

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
    for candidate in (folder, os.path.join(folder, EXTRA_DIR), os.path.join(folder, "network")):
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
