"""Tune trial schedulers for latency-accuracy sweeps, by name: FIFO, ASHA on a scalar score, Pareto-aware ASHA.

The ASHA baseline ranks trials on one metric, ``score``, which the trial computes itself, e.g. with
:func:`proxyless_ray.pareto.scalarised_score` (``heldout_acc - w * ln(expected_latency_ms)``). The Pareto-aware
scheduler lives in :mod:`proxyless_ray.sweeps.pareto_asha`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from proxyless_ray.choices import SCHEDULERS, expected
from proxyless_ray.sweeps.pareto_asha import ParetoASHAScheduler


def asha_scalarised(metric: str = "score", mode: str = "max", time_attr: str = "epoch", max_t: float = 100,
                    grace_period: float = 1, reduction_factor: float = 3, **kwargs: Any) -> AsyncHyperBandScheduler:
    """Ray's ASHA on one scalar metric, the single-objective baseline.

    Args:
        metric: Result key of the scalar, by default ``score`` as computed in the trial by
            :func:`proxyless_ray.pareto.scalarised_score`.
        mode: ``"max"`` or ``"min"``.
        time_attr: Monotone progress counter (see :class:`ParetoASHAScheduler`).
        max_t: Largest ``time_attr`` a trial may reach.
        grace_period: First rung.
        reduction_factor: Halving rate.
        **kwargs: Passed on to ``AsyncHyperBandScheduler`` (``brackets``, ``stop_last_trials``).

    Returns:
        An ``AsyncHyperBandScheduler`` (``ASHAScheduler``).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if grace_period <= 0 or max_t < grace_period or reduction_factor <= 1:
        raise ValueError(f"need 0 < grace_period <= max_t and reduction_factor > 1, got grace_period={grace_period}, "
                         f"max_t={max_t}, reduction_factor={reduction_factor}")
    return AsyncHyperBandScheduler(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t,
                                   grace_period=grace_period, reduction_factor=reduction_factor, **kwargs)


def build_scheduler(name: str, **kwargs: Any) -> TrialScheduler:
    """Build a scheduler by name: ``fifo``, ``asha`` (:func:`asha_scalarised`) or ``pareto`` (Pareto ASHA).

    Args:
        name: One of :data:`SCHEDULERS`.
        **kwargs: Passed to the scheduler; ``fifo`` takes none.

    Raises:
        ValueError: Unknown name, or arguments given to ``fifo``.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown scheduler {name!r}; {expected(SCHEDULERS)}")
    return BUILDERS[name](**kwargs)


def fifo(**kwargs: Any) -> FIFOScheduler:
    """Every trial to the end, in order (the full grid)."""
    if kwargs:
        raise ValueError(f"the fifo scheduler takes no arguments, got {sorted(kwargs)}")
    return FIFOScheduler()


# One builder per name of the registry (proxyless_ray.choices.SCHEDULERS)
BUILDERS: dict[str, Callable[..., TrialScheduler]] = {"fifo": fifo, "asha": asha_scalarised,
                                                        "pareto": ParetoASHAScheduler}
