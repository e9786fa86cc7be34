"""ProxylessNAS (hardware-aware NAS, ICLR 2019, https://arxiv.org/abs/1812.00332) at cluster scale on Ray Train,
Ray Tune and MLflow.

The public API (:mod:`proxyless_ray.api`): :func:`load_experiment`, :func:`run_search`, :func:`run_sweep`,
:func:`retrain`, :func:`predict_latency`, and their results :class:`SearchResult`, :class:`SweepResult`,
:class:`RetrainResult`. (``run_search``, not ``search``: that name is the subpackage of the search engine.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxyless_ray.api import (
        Experiment,
        RetrainResult,
        SearchResult,
        SweepResult,
        load_experiment,
        predict_latency,
        retrain,
        run_search,
        run_sweep,
    )

__all__ = ["Experiment", "RetrainResult", "SearchResult", "SweepResult", "load_experiment", "predict_latency",
           "retrain", "run_search", "run_sweep"]


def __getattr__(name: str) -> Any:
    # deferred on purpose: importing any proxyless_ray module runs this file, and the API loads torch and the
    # drivers; the CLI's --help and the pure modules (arch, space, config) must not pay for that
    if name in __all__:
        from proxyless_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'proxyless_ray' has no attribute {name!r}")
