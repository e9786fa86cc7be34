"""Model registry: derived networks as versions of ``proxyless-<hardware>``, and loading them back.

Networks are logged with ``mlflow.pytorch.log_model`` in ``pickle`` format: MLflow's default (``pt2``, torch.export)
freezes one traced path, and pickling needs the class importable, which :class:`proxyless_ray.network.ProxylessNet`
is. Pip requirements are given, because inferring them costs 5-15 s per model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

MODEL_PREFIX = "proxyless-"


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
    with _fluent_uri(uri):
        info = mlflow.pytorch.log_model(
            net, name="model", run_id=run_id, serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], input_example=example,
            signature=infer_signature(example, output), registered_model_name=name)
    version = int(info.registered_model_version)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version_tags = {"acc": f"{acc:.6g}", "latency_ms": f"{latency_ms:.6g}", "run_id": run_id, "hardware": hardware,
                    "arch": net.arch.arch_string(), **{k: str(v) for k, v in (tags or {}).items()}}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return version


def load_registered(uri: str, model_uri: str) -> nn.Module:
    """Load a registered network (``models:/proxyless-pixel1/3``, ``runs:/<id>/model``...) in eval mode.

    Args:
        uri: Tracking (and registry) URI.
        model_uri: Any MLflow model URI.
    """
    import mlflow.pytorch

    with _fluent_uri(uri):
        return mlflow.pytorch.load_model(model_uri, map_location="cpu").eval()


def model_versions(uri: str, hardware: str) -> list[Any]:
    """Registered versions of ``proxyless-<hardware>`` (``ModelVersion`` objects, newest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name = '{registered_name(hardware)}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)
