"""Device fingerprints: what a measured profile's numbers depend on, recorded with it and compared where it is used.

A CPU profile's latencies belong to one CPU model, its ISA (oneDNN picks AVX2, AVX-512 or AMX kernels from it), the
threads it ran on and the torch build; a CUDA profile's to the GPU, its driver and the CUDA runtime. A profile
measured elsewhere still prices architectures, but its milliseconds may be off by 2x or more on this machine, so
searches and ``proxyless-ray latency`` say so in one line (and refuse in strict mode). Analytic and imported
profiles were never measured on a machine like this one: they say what they are instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

# CPU flags (as /proc/cpuinfo spells them) that change which kernels oneDNN and ATen run.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd",
             "sve")
# Fields whose difference makes a profile's latencies suspect (the rest is recorded for the reader).
CPU_KEYS = ("device", "vendor", "model", "isa", "threads", "torch", "torch_build", "cpu_capability")
GPU_KEYS = ("device", "gpu_name", "driver", "cuda", "torch", "torch_build")
UNKNOWN = "unknown machine"


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                key = key.strip()
                if not sep:
                    if out:
                        break  # the first processor's block is enough
                    continue
                out.setdefault(key, value.strip())
    except OSError:
        pass
    return out


def _torch_build() -> tuple[str, str, str]:
    """``(version, build, cpu_capability)``: the build says which git commit, CUDA and oneDNN it was made with."""
    import torch

    git = (getattr(torch.version, "git_version", "") or "")[:10]
    mkldnn = torch.backends.mkldnn.is_available()
    build = f"git {git or '?'}, cuda {torch.version.cuda or 'none'}, mkldnn {'on' if mkldnn else 'off'}"
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return str(torch.__version__), build, capability


def cpu_fingerprint(threads: int) -> dict[str, Any]:
    """This machine's CPU fingerprint for a run on ``threads`` torch threads."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    version, build, capability = _torch_build()
    return {
        "device": "cpu",
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or platform.machine(),
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "threads": int(threads),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "torch": version,
        "torch_build": build,
        "cpu_capability": capability,
        "os": f"{platform.system()} {platform.machine()}",
    }


def gpu_fingerprint(device: str = "cuda") -> dict[str, Any]:
    """The fingerprint of CUDA device ``device`` here (name, compute capability, driver, CUDA runtime, torch)."""
    import torch

    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    version, build, _ = _torch_build()
    return {
        "device": "gpu",
        "gpu_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": nvidia_driver(),
        "cuda": str(torch.version.cuda),
        "cudnn": _cudnn_version(),
        "torch": version,
        "torch_build": build,
    }


def _cudnn_version() -> str:
    import torch

    try:
        return str(torch.backends.cudnn.version())
    except (RuntimeError, ValueError):  # a torch build without cuDNN, or one that cannot load it
        return "unknown"


def nvidia_driver(path: str = "/proc/driver/nvidia/version") -> str:
    """The NVIDIA kernel driver's version (from ``/proc/driver/nvidia/version``), or ``unknown``."""
    try:
        with open(path) as fh:
            first = fh.readline()
    except OSError:
        return "unknown"
    for word in first.split():
        if word[:1].isdigit() and "." in word:
            return word
    return "unknown"


def machine_fingerprint(device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """The fingerprint of ``device`` (``cpu``, ``cuda``, ``cuda:N``) on this machine; the CPU's when CUDA is asked
    for on a machine without it (a GPU profile then differs in ``device``)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return gpu_fingerprint(device)
    return cpu_fingerprint(threads)


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """12 hex digits over the compared fields: equal ids, same kind of machine (cache key of local profiles)."""
    keys = GPU_KEYS if fp.get("device") == "gpu" else CPU_KEYS
    text = json.dumps({k: fp.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_known(fp: Any) -> bool:
    """A recorded fingerprint that can be compared (``known: false`` marks a profile from an unrecorded machine)."""
    return isinstance(fp, Mapping) and fp.get("known", True) is not False and "device" in fp


def differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """What differs between a profile's fingerprint and this machine's, as short ``field: there -> here`` texts.

    Only fields that change latency are compared (:data:`CPU_KEYS`, :data:`GPU_KEYS`); an unrecorded machine
    differs in everything and says so.
    """
    if not is_known(recorded):
        note = recorded.get("note") if isinstance(recorded, Mapping) else None
        return [UNKNOWN + (f" ({note})" if note else "")]
    if recorded.get("device") != here.get("device"):
        return [f"device: {recorded.get('device')} -> {here.get('device')}"]
    out = []
    for key in (GPU_KEYS if here.get("device") == "gpu" else CPU_KEYS):
        a, b = recorded.get(key), here.get(key)
        if key == "isa" and isinstance(a, list) and isinstance(b, list):
            gone, new = [f for f in a if f not in b], [f for f in b if f not in a]
            if gone or new:
                out.append("isa: " + " ".join([f"-{f}" for f in gone] + [f"+{f}" for f in new]))
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def describe(fp: Any) -> str:
    """One short phrase naming a fingerprint's machine."""
    if not is_known(fp):
        return UNKNOWN
    if fp.get("device") == "gpu":
        return f"{fp.get('gpu_name')} (driver {fp.get('driver')}, CUDA {fp.get('cuda')})"
    isa = [f for f in fp.get("isa", []) if f.startswith(("avx512", "amx"))] or [f for f in fp.get("isa", [])
                                                                                 if f == "avx2"]
    return f"{fp.get('model')}, {fp.get('threads')} thread(s), {'/'.join(isa) or 'no avx2'}, torch {fp.get('torch')}"


class FingerprintMismatch(ValueError):
    """A measured profile's fingerprint differs from the machine it is used on, and strict mode is on."""


def machine_note(profile: Any, here: Mapping[str, Any] | None = None, where: str = "this machine") -> str | None:
    """One line on whether ``profile`` describes the machine it is used on, or ``None`` when it does.

    Analytic, imported and fitted profiles are never compared: the line says what they are.

    Args:
        profile: A :class:`~proxyless_ray.latency.profile.Profile` (anything without metadata, e.g. the FLOPs
            model, gets ``None``).
        here: This machine's fingerprint (measured from the profile's device and threads when omitted).
        where: How to name this machine in the line (``Ray node 1a2b3c``).
    """
    md = getattr(profile, "metadata", None)
    if not isinstance(md, Mapping):
        return None
    if md.get("method") != "measured":
        return (f"profile {profile.name!r} is {md.get('method')} ({md.get('device_name')}), not measured on a "
                f"machine: its latencies are not compared with {where}")
    recorded = md.get("fingerprint")
    if here is None:
        device = "cuda" if md.get("device") == "gpu" else "cpu"
        here = machine_fingerprint(device, int(md.get("threads") or 1))
    hint = " (cpu_local measures this CPU)" if md.get("device") == "cpu" else ""
    if not is_known(recorded):
        note = recorded.get("note") if isinstance(recorded, Mapping) else None
        return (f"profile {profile.name!r} was measured on an unrecorded machine{f' ({note})' if note else ''}, "
                f"so its latencies may not hold on {where} ({describe(here)}){hint}")
    diff = differences(recorded, here)
    if not diff:
        return None
    return (f"profile {profile.name!r} was measured on another machine than {where}: {'; '.join(diff)}; its "
            f"latencies may not hold here{hint}")


def check_machine(profile: Any, strict: bool = False, here: Mapping[str, Any] | None = None,
                  where: str = "this machine", stream: Any = None, unmeasured: bool = True) -> str | None:
    """Warn in one line (on ``stream``, stderr by default) when a measured profile was measured elsewhere.

    ``unmeasured=False`` keeps quiet about analytic and imported profiles (a Ray worker leaves that to the driver,
    which says it once).

    Raises:
        FingerprintMismatch: in ``strict`` mode, when the fingerprints differ (analytic/imported profiles pass:
            strict mode cannot ask them to match a machine).
    """
    note = machine_note(profile, here, where)
    if note is None:
        return None
    measured = getattr(profile, "metadata", {}).get("method") == "measured"
    if not measured and not unmeasured:
        return None
    if strict and measured:
        raise FingerprintMismatch(f"latency.strict: {note}; re-measure it here (proxyless-ray profile) or "
                                  f"turn strict mode off")
    out = stream or sys.stderr
    out.write(f"[proxyless-ray] {note}\n")  # not print(): Ray Train workers patch it to log each line twice
    out.flush()
    return note


__all__ = ["CPU_KEYS", "GPU_KEYS", "ISA_FLAGS", "FingerprintMismatch", "check_machine", "cpu_fingerprint",
           "describe", "differences", "fingerprint_id", "gpu_fingerprint", "is_known", "machine_fingerprint",
           "machine_note"]
