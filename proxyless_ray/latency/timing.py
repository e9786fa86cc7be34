"""Timing primitives shared by the profiler and the end-to-end checks: device names, the statistic a profile
reads from its repeats (median, min or a percentile, over a small window of ranks), a robust spread, and time marks
on the host clock or CUDA events."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """Validate a device string; raises ValueError naming it unless it is ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def quantile_of(statistic: str) -> float:
    """``median`` -> 0.5, ``min`` -> 0, ``p10`` -> 0.1; raises ValueError naming anything else."""
    if statistic == "median":
        return 0.5
    if statistic == "min":
        return 0.0
    m = re.match(r"^p(\d{1,2})$", str(statistic))
    if not m:
        raise ValueError(f"unknown timing statistic {statistic!r}; expected 'median', 'min' or 'pNN' (e.g. 'p10')")
    return int(m.group(1)) / 100


def quantile_window(n: int, statistic: str) -> slice:
    """Ranks (in sorted order) whose mean estimates ``statistic``: 5 % of ``n`` samples, at least 3, centred on the
    quantile's rank. ``min`` is thus the mean of the fastest few runs: steadier than the single fastest one."""
    width = min(n, max(3, round(0.05 * n)))
    lo = min(max(round(quantile_of(statistic) * (n - 1)) - width // 2, 0), n - width)
    return slice(lo, lo + width)


def robust_stats(samples: Sequence[float], statistic: str = "median") -> tuple[float, float]:
    """The chosen statistic (default median; see :func:`quantile_window`) and a robust spread (IQR / 1.349, the
    standard deviation for normal noise)."""
    if not samples:
        raise ValueError("no timing samples")
    xs = sorted(samples)
    value = statistics.fmean(xs[quantile_window(len(xs), statistic)])
    if len(xs) < 4:
        return value, (xs[-1] - xs[0]) / 2
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return value, (q[2] - q[0]) / 1.349


class Stamps:
    """Time marks between consecutive calls: the host clock on CPU; CUDA events on a GPU.

    Kernel launches are asynchronous, so a host clock would time the launches only: each mark records an event
    on the stream, and the last event is synchronised before any ``elapsed_time`` is read.

    Args:
        events: A module with ``Event(enable_timing=True)`` (``torch.cuda``), or ``None`` for the host clock.
        clock: Host clock: ``wall`` (``perf_counter``) or ``thread`` (CPU time of this thread, which leaves out
            the time the OS gives to other processes; equal to wall time for one busy thread on a quiet machine).
    """

    def __init__(self, events: Any = None, clock: str = "wall"):
        self.events = events
        self.now = time.thread_time if clock == "thread" else time.perf_counter
        self.marks: list[Any] = []

    def start(self) -> None:
        self.marks = []
        self.mark()

    def mark(self) -> None:
        if self.events is None:
            self.marks.append(self.now())
        else:
            ev = self.events.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)

    def durations_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.events is None:
            return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        self.marks[-1].synchronize()
        return [float(a.elapsed_time(b)) for a, b in zip(self.marks, self.marks[1:])]
