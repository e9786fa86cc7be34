"""Differentiable expected latency of a supernet: fixed layers + sum over mixed layers of sum_i p_i * lat_i.

ProxylessNAS eq. (5), https://arxiv.org/abs/1812.00332: E[lat] = sum_l sum_i softmax(alpha_l)_i * F(op_i), with
F from a per-hardware latency model; zero ops cost 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxyless_ray.latency.model import LatencyModel, layer_latency
from proxyless_ray.nn.arch import ZERO
from proxyless_ray.nn.space import SearchSpace


class SupernetLatency:
    """Per-candidate latency vectors of every mixed layer, looked up once, for fast E[lat] in every arch step.

    Args:
        model: A latency model.
        space: The search space the supernet realises.
    """

    def __init__(self, model: LatencyModel, space: SearchSpace):
        self.model = model
        self.fixed_ms = float(sum(layer_latency(model, layer) for layer in space.fixed_layers()))
        self.vectors = [
            torch.tensor([0.0 if c == ZERO else float(model.lat_ms(c, s.in_chs, s.resolution)) for c in s.candidates])
            for s in space.slots()
        ]

    def expected(self, alphas: Sequence[torch.Tensor]) -> torch.Tensor:
        """E[lat] in ms, differentiable in the architecture logits."""
        device = alphas[0].device if len(alphas) else torch.device("cpu")
        total = torch.tensor(self.fixed_ms, device=device)
        for a, v in zip(alphas, self.vectors):
            total = total + (torch.softmax(a, dim=0) * v.to(a.device)).sum()
        return total

    def of_choices(self, choices: Sequence[int]) -> float:
        """Latency of one sub-network (a candidate index per mixed layer)."""
        return self.fixed_ms + float(sum(v[c] for v, c in zip(self.vectors, choices)))
