"""The demo's summary of its fronts: best accuracy, depth, latency span, and latency against lambda."""

import pandas as pd
import pytest

from proxyless_ray.demo import front_quality, searchable_kept

DEEP = "mb_k3_e1_c16_s1|mb_k3_e3_c16_s1,mb_k5_e6_c16_s1|mb_k5_e3_c24_s2,zero,mb_k3_e3_c24_s1"
SHALLOW = "mb_k3_e1_c16_s1|zero,zero|mb_k3_e3_c24_s2,zero,zero"


def rows(hw, lam, acc, e_lat, argmax_lat, arch, on_front=True, retrained=None):
    return {"trial_id": f"{hw}-{lam}", "hardware": hw, "lambda": lam, "heldout_acc": acc, "expected_latency_ms": e_lat,
            "argmax_latency_ms": argmax_lat, "arch": arch, "on_front": on_front, "finished": True,
            "retrained_test_acc": retrained}


def test_searchable_kept_counts_layers_after_the_fixed_block():
    assert searchable_kept(DEEP) == (4, 5)
    assert searchable_kept(SHALLOW) == (1, 5)


def test_front_quality_reads_the_best_network_its_depth_and_the_span():
    table = pd.DataFrame([rows("cpu", 0.02, 0.80, 6.0, 6.2, DEEP, retrained=0.89),
                          rows("cpu", 0.1, 0.78, 4.0, 4.1, DEEP, retrained=0.87),
                          rows("cpu", 0.5, 0.70, 2.0, 2.5, SHALLOW, retrained=0.84),
                          rows("gpu", 0.02, 0.80, 1.0, 1.0, DEEP, on_front=False),
                          rows("gpu", 0.5, 0.79, 1.1, 1.0, SHALLOW)])
    q = front_quality(table)
    cpu = q["cpu"]
    assert cpu["best_acc"] == 0.89 and cpu["best_layers_kept"] == "4/5" and cpu["accuracy"] == "retrained_test_acc"
    assert cpu["front_latency_span"] == pytest.approx(6.2 / 2.5)
    assert cpu["latency_non_increasing_in_lambda"] is True
    gpu = q["gpu"]
    assert gpu["front_size"] == 1 and gpu["accuracy"] == "heldout_acc"  # nothing retrained: the held-out reading
    assert gpu["latency_non_increasing_in_lambda"] is False  # 1.0 -> 1.1 ms as lambda grows


def test_descendants_lists_the_process_tree_and_running_drops_the_exited():
    import os
    import subprocess
    import time

    from proxyless_ray.demo import _descendants, _running

    child = subprocess.Popen(["sh", "-c", "sleep 5 & wait"])
    try:
        t_end = time.monotonic() + 5
        while not _descendants(child.pid) and time.monotonic() < t_end:
            time.sleep(0.05)  # the grandchild appears once sh has forked it
        grandchildren = _descendants(child.pid)
        found = _descendants(os.getpid())
        assert grandchildren and child.pid in found and grandchildren <= found
        assert all(_running(pid) for pid in grandchildren)
    finally:
        child.kill()
        child.wait()
    assert not _running(child.pid)



def test_shutdown_waits_for_new_processes_only(capsys):
    """A process that ran before Ray started (a tracking server, another test's) is not waited for: the demo's
    fine-tunes must not sit out the timeout on it. Without ``keep`` the same process is waited for and named."""
    import os
    import subprocess

    from proxyless_ray.demo import _descendants, shutdown_and_wait

    older = subprocess.Popen(["sleep", "30"])
    try:
        shutdown_and_wait(timeout_s=0.5, keep=_descendants(os.getpid()))  # older, and whatever earlier tests left
        assert "still running" not in capsys.readouterr().err
        shutdown_and_wait(timeout_s=0.5)
        assert str(older.pid) in capsys.readouterr().err
    finally:
        older.kill()
        older.wait()
