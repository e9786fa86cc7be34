"""benchmarks/bench_threads.py: the per-thread CPU reading (the benchmark itself takes minutes)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_threads")


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds  # this thread's own CPU time: other threads may run meanwhile
    while time.thread_time() < end:
        pass


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux /proc")
def test_thread_ticks_charge_each_thread_its_own_cpu_time(bench):
    done = threading.Event()
    idle = threading.Thread(target=done.wait, args=(30,))
    idle.start()
    seen: dict[int, int] = {}

    def burn() -> None:
        spin(0.4)
        seen.update(bench.thread_ticks())
        done.set()

    burner = threading.Thread(target=burn)
    burner.start()
    burner.join(timeout=30)
    idle.join(timeout=30)
    hz = os.sysconf("SC_CLK_TCK")
    assert seen[burner.native_id] >= 0.3 * hz  # it spun 0.4 s of its own CPU time
    assert seen[idle.native_id] <= 0.05 * hz
    assert burner.native_id not in bench.thread_ticks()  # a finished thread leaves /proc/self/task
