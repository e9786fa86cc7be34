"""The latency-model interface, ``lat_ms(block, in_chs, resolution)``, and the FLOPs placeholder model.

Any object with a ``name`` and that method prices architectures; hardware profiles
(:mod:`proxyless_ray.latency.profile`) are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxyless_ray.latency.flops import layer_cost
from proxyless_ray.latency.local import is_local, local_profile
from proxyless_ray.latency.profile import Profile, check_space, load_profile
from proxyless_ray.nn.arch import Arch, Layer, parse_block
from proxyless_ray.nn.space import SearchSpace


class LatencyModel(Protocol):
    """Predicts the latency in ms of one layer at a given input shape (batch and dtype are the model's own)."""

    name: str

    def lat_ms(self, block: str, in_chs: int, resolution: int) -> float: ...


def layer_latency(model: LatencyModel, layer: Layer) -> float:
    """Latency of a placed layer; zero layers cost nothing."""
    if not layer.block.startswith("fc_c") and parse_block(layer.block).is_zero:
        return 0.0
    return float(model.lat_ms(layer.block, layer.in_chs, layer.resolution))


def arch_latency(model: LatencyModel, arch: Arch) -> tuple[float, list[tuple[Layer, float]]]:
    """Total and per-layer predicted latency of a whole network (stem, blocks, feature mix, classifier)."""
    per_layer = [(layer, layer_latency(model, layer)) for layer in arch.layers()]
    return sum(ms for _, ms in per_layer), per_layer


@dataclass(frozen=True)
class FlopsLatencyModel:
    """Placeholder: latency proportional to MACs plus a per-kernel overhead (no hardware measured)."""

    ms_per_gmac: float = 10.0
    ms_per_kernel: float = 0.01
    name: str = "flops"

    def lat_ms(self, block: str, in_chs: int, resolution: int) -> float:
        cost = layer_cost(block, in_chs, resolution)
        return cost.macs / 1e9 * self.ms_per_gmac + cost.kernels * self.ms_per_kernel


def load_latency_model(spec: str, strict: bool = False) -> LatencyModel:
    """Resolve ``flops``, a hardware profile (a name in ``hardware_profiles/`` or a path) or ``cpu_local``.

    Without a search space, ``cpu_local`` is the newest profile of this CPU in the local cache
    (:mod:`proxyless_ray.latency.local`); :func:`load_latency_model_for` measures one when it is missing.

    Raises:
        ValueError / FileNotFoundError: naming the spec when it cannot be resolved.
    """
    if spec == "flops":
        return FlopsLatencyModel()
    if is_local(spec):
        return local_profile(spec, None, strict=strict)
    return load_profile(spec, strict=strict)


def load_latency_model_for(spec: str, space: SearchSpace, strict: bool = False) -> LatencyModel:
    """:func:`load_latency_model`, then check that a hardware profile can price every layer of ``space``
    (``cpu_local`` is measured for ``space`` on first use).

    Raises:
        ValueError: naming the profile, the space's fingerprint and missing shapes when the profile was measured
            for another space and strict mode (or a missing predictor) forbids predicting them.
    """
    if is_local(spec):  # this machine's CPU: measured for the space on first use, then read from the cache
        return local_profile(spec, space, strict=strict)
    model = load_latency_model(spec, strict=strict)

    if isinstance(model, Profile):
        check_space(model, space)
    return model
