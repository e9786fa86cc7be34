"""The hardware target of a search, resolved once: its latency model, what it is, and how strictly it is held.

An experiment names its target by a spec (``latency.profile``: ``flops``, a profile name or path, ``cpu_local``).
Resolving the spec reads a profile (``cpu_local``: measures this CPU, or reads its cache) and checks it against the
search space. A search or sweep trial resolves it once into a :class:`HardwareTarget` and hands that object to
whatever prices, tags or times against the target: the search loop and its objective, the outputs, the MLflow tags,
a retraining's prediction and timing. Another process (a Ray Train worker, a Tune trial) resolves its own, from the
YAML text the driver resolved when the target is this machine's CPU (:attr:`HardwareTarget.text`), so it neither
measures again nor needs the driver's disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxyless_ray.latency.fingerprint import check_machine, cpu_fingerprint
from proxyless_ray.latency.local import is_local, local_threads
from proxyless_ray.latency.model import FlopsLatencyModel, LatencyModel, load_latency_model_for
from proxyless_ray.latency.profile import Profile, load_profile, profile_from_text
from proxyless_ray.nn.space import SearchSpace

if TYPE_CHECKING:
    from proxyless_ray.config import Experiment


@dataclass(frozen=True)
class HardwareTarget:
    """A resolved latency target.

    Attributes:
        spec: The target as the experiment names it (``pixel1``, a path, ``flops``, ``cpu_local``).
        model: Its latency model: a :class:`~proxyless_ray.latency.profile.Profile` or the FLOPs placeholder.
        strict: ``latency.strict``: a shape the profile does not hold, or a profile measured on another machine,
            is an error instead of a prediction or a warning.
    """

    spec: str
    model: LatencyModel
    strict: bool = False

    @property
    def name(self) -> str:
        """The model's name (a profile's own name, which names the registered models)."""
        return self.model.name

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The profile's metadata (device, threads, method, fingerprint...); empty for ``flops``."""
        md = getattr(self.model, "metadata", None)
        return md if isinstance(md, Mapping) else {}

    @property
    def kind(self) -> str:
        """How its latencies were obtained: ``measured``, ``imported``, ``fitted``, ``analytic`` or ``flops``."""
        return "flops" if isinstance(self.model, FlopsLatencyModel) else str(self.metadata.get("method", ""))

    @property
    def fingerprint(self) -> Mapping[str, Any] | None:
        """The machine a measured profile was measured on, as recorded in its metadata."""
        fp = self.metadata.get("fingerprint")
        return fp if isinstance(fp, Mapping) else None

    @property
    def text(self) -> str | None:
        """The profile as YAML for another process when the target is this machine's CPU (``cpu_local``), else
        None (the other process reads the same shipped file or computes the same FLOPs)."""
        return self.model.to_yaml() if is_local(self.spec) and isinstance(self.model, Profile) else None

    def info(self) -> dict[str, str]:
        """``hardware``, ``device`` and ``platform``: what MLflow tags a run of this target with."""
        return target_info(self.spec, self.model)

    def check_machine(self, where: str = "this machine", stream: Any = None, unmeasured: bool = True) -> str | None:
        """One line when a measured profile was measured on another machine than ``where`` (refused when strict);
        see :func:`proxyless_ray.latency.fingerprint.check_machine`."""
        return check_machine(self.model, strict=self.strict, where=where, stream=stream, unmeasured=unmeasured)


def resolve_target(spec: str, space: SearchSpace, strict: bool = False, text: str | None = None) -> HardwareTarget:
    """Resolve ``spec`` for ``space`` (:func:`proxyless_ray.latency.model.load_latency_model_for`), or take the
    profile from ``text``, the YAML another process resolved (:attr:`HardwareTarget.text`).

    Raises:
        ValueError / FileNotFoundError: naming the spec when it cannot be resolved or does not fit the space.
    """
    if text:
        model: LatencyModel = profile_from_text(text, f"profile {spec!r} from the driver", strict)
    else:
        model = load_latency_model_for(spec, space, strict=strict)
    return HardwareTarget(spec, model, strict)


def target_of(exp: Experiment, text: str | None = None) -> HardwareTarget:
    """The hardware target of an experiment (``exp.latency.profile`` for ``exp.space``, ``exp.latency.strict``)."""
    return resolve_target(exp.latency.profile, exp.space, exp.latency.strict, text)


def target_info(spec: str, model: LatencyModel | None = None) -> dict[str, str]:
    """``hardware`` (the profile's name), ``device`` and ``platform`` of a target; ``model`` is its resolved model,
    loaded from ``spec`` when None (``cpu_local`` is named without measuring this CPU)."""
    if spec == "flops" or isinstance(model, FlopsLatencyModel):
        return {"hardware": "flops", "device": "none", "platform": "FLOPs placeholder (no hardware)"}
    threads = local_threads(spec)
    if threads is not None:  # this machine's CPU: named the same whether or not it was measured yet
        return {"hardware": spec, "device": "cpu", "platform": f"local CPU: {cpu_fingerprint(threads)['model']}"}
    if model is None:
        model = load_profile(spec)
    md = getattr(model, "metadata", None) or {}
    return {"hardware": model.name, "device": str(md.get("device", "")), "platform": str(md.get("device_name", ""))}


__all__ = ["HardwareTarget", "resolve_target", "target_info", "target_of"]
