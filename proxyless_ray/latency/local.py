"""``cpu_local``: the CPU this runs on, profiled on first use in a quick mode and cached per user.

A shipped CPU table is someone else's CPU. ``cpu_local`` (1 torch thread) and ``cpu_local_<N>threads`` name this
machine's CPU instead: the first use measures the layer shapes the experiment's space needs (the profiler's cover
networks, :mod:`proxyless_ray.latency.profiler`, with :data:`QUICK` settings) and caches the profile under
``$XDG_CACHE_HOME/proxyless_ray/profiles`` (default ``~/.cache/proxyless_ray/profiles``), keyed by the machine's
fingerprint, the space's fingerprint and the thread count. Later uses read the cache. A cached file that does not
parse, or that another machine or space wrote, is measured again with a message; writes go through a temporary
file and a rename under a lock file, so two searches starting at once measure once and never read half a profile.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from proxyless_ray.latency.fingerprint import cpu_fingerprint, describe, differences, fingerprint_id
from proxyless_ray.latency.profile import Profile, read_profile
from proxyless_ray.latency.profiler import ProfilerSettings, profile_spaces
from proxyless_ray.nn.space import SearchSpace

LOCAL_CPU = "cpu_local"
_LOCAL_RE = re.compile(r"^cpu_local(?:_(\d+)threads?)?$")
# Quick mode: the median over 6 s of runs per cover network, in 12 rounds of 0.5 s that visit the cover networks
# in a new order each time (the machine's speed can drift by tens of percent over seconds on a shared VM: short,
# many, interleaved windows let a slow spell hit every network alike, and spread the profile over tens of seconds, so
# that it averages the drift as a later measurement does); the median, not the minimum, because networks are then
# timed by their median. max_repeats lifts the cap that would otherwise cut a 0.5 s window short.
# On one thread the clock is the timing thread's CPU time: other processes on the machine (a browser, a second
# search) then lengthen neither the profile nor the networks checked against it; it equals wall time when the CPU
# is free. Several threads are timed by the wall clock (CPU time would add the threads up).
QUICK = {"warmup": 5, "repeats": 40, "min_time_s": 6.0, "rounds": 12, "max_repeats": 6000, "statistic": "median"}

def local_threads(spec: str) -> int | None:
    """Torch threads a local CPU name means (``cpu_local`` -> 1, ``cpu_local_2threads`` -> 2), else ``None``."""
    m = _LOCAL_RE.match(str(spec))
    if not m:
        return None
    threads = int(m.group(1) or 1)
    if threads < 1:
        raise ValueError(f"hardware {spec!r}: thread count must be >= 1")
    return threads


def is_local(spec: str) -> bool:
    """Whether ``spec`` names this machine's CPU (``cpu_local`` or ``cpu_local_<N>threads``)."""
    return local_threads(spec) is not None


def quick_settings(threads: int = 1, device: str = "cpu") -> ProfilerSettings:
    """The profiler settings of quick mode (``proxyless-ray profile --quick`` and ``cpu_local``)."""
    clock = "thread" if device == "cpu" and threads == 1 else "wall"
    return ProfilerSettings(device=device, threads=threads, clock=clock, **QUICK)


def cache_dir() -> Path:
    """The per-user folder of local profiles: ``$XDG_CACHE_HOME/proxyless_ray/profiles`` or ``~/.cache/...``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "proxyless_ray" / "profiles"


def cache_path(fingerprint: dict[str, Any], space: SearchSpace, threads: int) -> Path:
    """Where the local profile of this machine, ``space`` and ``threads`` is cached."""
    return cache_dir() / f"{LOCAL_CPU}-{fingerprint_id(fingerprint)}-{space.fingerprint()}-t{threads}.yaml"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (a second process waits while the first measures, then reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_cached(path: Path, here: dict[str, Any], space: SearchSpace | None = None) -> tuple[Profile | None, str]:
    """The cached profile at ``path`` if it is whole and was measured here (for ``space``), else why not.

    Returns:
        ``(profile, "")``, or ``(None, reason)`` (``reason`` empty when there is simply no file).
    """
    if not path.is_file():
        return None, ""
    try:
        prof = read_profile(path)
    except (ValueError, OSError) as err:
        return None, f"it is corrupt ({str(err).splitlines()[0][:200]})"
    md = prof.metadata
    if md.get("method") != "measured" or md.get("device") != "cpu":
        return None, f"it is not a measured CPU profile (method {md.get('method')!r}, device {md.get('device')!r})"
    diff = differences(md.get("fingerprint") or {}, here)
    if diff:
        return None, f"it was measured on another machine ({'; '.join(diff)})"
    if space is not None:
        fps = [s.get("fingerprint") for s in md.get("spaces") or [] if isinstance(s, dict)]
        if space.fingerprint() not in fps:
            return None, f"it was measured for space(s) {fps}, not {space.fingerprint()}"
    return prof, ""


def local_profile(spec: str, space: SearchSpace | None, strict: bool = False, progress: bool = True,
                  stream: TextIO | None = None, settings: ProfilerSettings | None = None) -> Profile:
    """Resolve a local CPU name: the cached profile of this machine and ``space``, measured first if need be.

    Args:
        spec: ``cpu_local`` or ``cpu_local_<N>threads``.
        space: The search space whose layer shapes must be measured. ``None``: the newest valid cached profile of
            this machine and thread count, whatever its space (an error when there is none).
        strict: The returned profile's strict flag.
        progress: Show the profiler's progress bar while measuring.
        stream: Where messages and the bar go (stderr).
        settings: Profiler settings (default: :func:`quick_settings`).

    Raises:
        ValueError: ``spec`` is not a local name, or ``space`` is ``None`` and nothing is cached.
    """
    threads = local_threads(spec)
    if threads is None:
        raise ValueError(f"{spec!r} is not a local CPU name; expected 'cpu_local' or 'cpu_local_<N>threads'")
    out = stream or sys.stderr
    here = cpu_fingerprint(threads)
    if space is None:
        return replace(_newest_cached(spec, here, threads), strict=strict)
    path = cache_path(here, space, threads)
    with _locked(path):
        prof, why = read_cached(path, here, space)
        if prof is None:
            if why:
                print(f"[proxyless-ray] cached local profile {path} is not used: {why}; measuring again", file=out,
                      flush=True)
            print(f"[proxyless-ray] {spec}: measuring this CPU ({describe(here)}) for space {space.fingerprint()} "
                  f"in quick mode, once; cached in {path}", file=out, flush=True)
            prof = profile_spaces([space], settings or quick_settings(threads), spec, progress=progress, stream=out)
            prof = read_profile(prof.save(path))  # as later uses will read it (entries rounded in the file)
    return replace(prof, name=spec, strict=strict)


def _newest_cached(spec: str, here: dict[str, Any], threads: int) -> Profile:
    pattern = f"{LOCAL_CPU}-{fingerprint_id(here)}-*-t{threads}.yaml"
    folder = cache_dir()
    paths = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in paths:
        prof, _ = read_cached(path, here)
        if prof is not None:
            return replace(prof, name=spec)
    raise ValueError(f"{spec}: no profile of this CPU is cached in {str(folder)!r} yet and no search space was given "
                     f"to measure; give one (--space <preset or experiment>) or run proxyless-ray profile --quick")


__all__ = ["LOCAL_CPU", "QUICK", "cache_dir", "cache_path", "is_local", "local_profile", "local_threads",
           "quick_settings", "read_cached"]
