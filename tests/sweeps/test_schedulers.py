"""Schedulers by name, and the ASHA baseline's arguments."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from proxyless_ray.choices import SCHEDULERS
from proxyless_ray.sweeps.pareto_asha import ParetoASHAScheduler
from proxyless_ray.sweeps.schedulers import BUILDERS, asha_scalarised, build_scheduler


def test_build_scheduler():
    assert type(build_scheduler("fifo")) is FIFOScheduler
    asha = build_scheduler("asha", max_t=8, grace_period=1, reduction_factor=2)
    assert isinstance(asha, AsyncHyperBandScheduler) and asha.metric == "score" and asha._time_attr == "epoch"
    pareto = build_scheduler("pareto", max_t=8, reduction_factor=2, group_by="hw")
    assert isinstance(pareto, ParetoASHAScheduler) and pareto.rungs == (1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"unknown scheduler 'hb'; expected one of \['fifo', 'asha', 'pareto'\]"):
        build_scheduler("hb")
    with pytest.raises(ValueError, match="no arguments"):
        build_scheduler("fifo", max_t=3)
    with pytest.raises(ValueError, match="mode"):
        asha_scalarised(mode="up")
    assert SCHEDULERS == ("fifo", "asha", "pareto")


def test_every_registered_scheduler_has_a_builder():
    assert tuple(BUILDERS) == SCHEDULERS
