"""Latency-aware objectives as small pure functions (ProxylessNAS, https://arxiv.org/abs/1812.00332, Sec. 3.3).

* ``add``:     CE + lambda * (E[lat] - ref) / ref            (the original code's ``add#linear``)
* ``mul_log``: alpha * CE * (log E[lat] / log target) ** beta  (the original code's ``mul#log``, MnasNet-like)

The REINFORCE reward uses the same forms on a sampled network's accuracy and latency.
"""

from __future__ import annotations

import math

import torch

from proxyless_ray.choices import LOSSES, expected


def add_loss(ce: torch.Tensor, exp_lat: torch.Tensor, lam: float, ref_ms: float) -> torch.Tensor:
    """``CE + lam * (E[lat] - ref) / ref``."""
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if ref_ms <= 0:
        raise ValueError(f"reference latency must be > 0 ms, got {ref_ms}")
    return ce + lam * (exp_lat - ref_ms) / ref_ms


def mul_log_loss(ce: torch.Tensor, exp_lat: torch.Tensor, alpha: float, beta: float, target_ms: float) -> torch.Tensor:
    """``alpha * CE * (log E[lat] / log target) ** beta``; latencies in ms, target > 1 ms so the log is positive."""
    if target_ms <= 0:
        raise ValueError(f"target latency must be > 0 ms, got {target_ms}")
    if target_ms <= 1.0:
        raise ValueError(f"mul_log needs a target latency above 1 ms (log target > 0), got {target_ms}")
    return alpha * ce * (torch.log(exp_lat) / math.log(target_ms)) ** beta


def latency_objective(loss: str, ce: torch.Tensor, exp_lat: torch.Tensor, *, lam: float = 0.0, ref_ms: float = 1.0,
                      alpha: float = 1.0, beta: float = 0.0, target_ms: float = 2.0) -> torch.Tensor:
    """Dispatch on the loss form's name (``add``, ``mul_log`` or ``none``)."""
    if loss == "add":
        return add_loss(ce, exp_lat, lam, ref_ms)
    if loss == "mul_log":
        return mul_log_loss(ce, exp_lat, alpha, beta, target_ms)
    if loss == "none":
        return ce
    raise ValueError(f"unknown latency loss {loss!r}; {expected(LOSSES)}")


def reward(loss: str, acc: float, lat_ms: float, *, lam: float = 0.0, ref_ms: float = 1.0, beta: float = 0.0,
           target_ms: float = 2.0) -> float:
    """Non-differentiable REINFORCE reward of a sampled network: accuracy traded against its latency.

    ``add``: ``acc - lam * (lat - ref) / ref``; ``mul_log``: ``acc * (log target / log lat) ** beta``
    (the original RL mode's ``acc * (ref / lat) ** w`` shape, in the log form of the gradient objective).
    """
    if loss == "add":
        return acc - lam * (lat_ms - ref_ms) / ref_ms
    if loss == "mul_log":
        return acc * (math.log(target_ms) / math.log(max(lat_ms, 1.0 + 1e-6))) ** beta
    return acc
