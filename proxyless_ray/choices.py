"""Every string choice of an experiment, in one registry each: config validation, the code that builds the thing and
the CLI's help all read these (pure Python, no torch, so the config and ``--help`` load without it).

ProxylessNAS: Cai, Zhu, Han, ICLR 2019, https://arxiv.org/abs/1812.00332
"""

from __future__ import annotations

from enum import Enum


class GateMode(str, Enum):
    """How architecture gradients are estimated (``train.gate_mode``)."""

    TWO = "two"
    FULL_V2 = "full_v2"
    REINFORCE = "reinforce"


class WarmupMethod(str, Enum):
    """How weight steps pick their paths while alpha is frozen (``train.warmup_method``)."""

    UNIFORM = "uniform"
    UNIFORM_DEPTH = "uniform_depth"
    FAIR = "fair"
    SANDWICH = "sandwich"
    LARGEST_FIRST = "largest_first"


def names(choice: type[Enum]) -> tuple[str, ...]:
    """The accepted strings of an enum registry, in declaration order."""
    return tuple(member.value for member in choice)


GATE_MODES = names(GateMode)
WARMUP_METHODS = names(WarmupMethod)
# latency.loss: how expected latency enters the objective (proxyless_ray.search.objective)
LOSSES = ("add", "mul_log", "none")
# sweep.scheduler: Tune trial schedulers (proxyless_ray.sweeps.schedulers builds each)
SCHEDULERS = ("fifo", "asha", "pareto")
# data.name: data sets (proxyless_ray.data.load_splits reads each)
DATASETS = ("fashion_mnist", "imagefolder", "parquet")


def expected(names: tuple[str, ...]) -> str:
    """``expected one of [...]`` for an error message."""
    return f"expected one of {list(names)}"


def choices_help() -> str:
    """The registries as the CLI's ``--set`` help lists them."""
    keys = {"data.name": DATASETS, "train.gate_mode": GATE_MODES, "train.warmup_method": WARMUP_METHODS,
            "latency.loss": LOSSES, "sweep.scheduler": SCHEDULERS}
    return "; ".join(f"{key}: {'|'.join(values)}" for key, values in keys.items())
