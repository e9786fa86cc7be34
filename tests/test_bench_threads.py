"""benchmarks/bench_threads.py: the per-thread CPU reading (the benchmark itself takes minutes)."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_threads.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_threads", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
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
