"""Process settings: the OpenMP wait policy chosen from the placement, its override, its log line, and that a
process really starts with it (libgomp reads it once, when torch loads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from proxyless_ray.cli.search import settle_local_threads
from proxyless_ray.config import load_experiment
from proxyless_ray.runtime import (
    THREAD_ENV_KEYS,
    WAIT_POLICIES,
    choose_wait_policy,
    local_policy,
    other_processes_cores,
    ray_worker_policy,
    thread_env,
)

from conftest import tiny_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(("threads", "processes", "cpus", "expected"), [
    (2, 1, 2, "spin"),  # one search on a 2-core machine: its threads have the cores
    (1, 2, 2, "spin"),  # 2 workers x 1 thread on 2 cores
    (2, 2, 2, "passive"),  # 2 workers x 2 threads on 2 cores: they share
    (4, 1, 2, "passive"),  # more threads than cores in one process
    (8, 4, 32, "spin"),
])
def test_auto_spins_only_where_each_thread_has_a_core(threads, processes, cpus, expected):
    policy, why = choose_wait_policy("auto", threads, processes, cpus)
    assert policy == expected
    assert f"{processes} process(es) x {threads} thread(s) on {cpus} CPUs" in why


@pytest.mark.parametrize("setting", ["spin", "passive"])
def test_a_set_policy_wins_over_the_placement(setting):
    for threads, processes in ((2, 1), (2, 2)):
        assert choose_wait_policy(setting, threads, processes, 2)[0] == setting


def test_passive_sleeps_at_once_and_spin_is_bounded():
    passive, spin = thread_env(True), thread_env(False)
    assert passive == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    assert set(spin) == set(THREAD_ENV_KEYS) and 0 < int(spin["GOMP_SPINCOUNT"]) < 10**8


def test_ray_workers_policy_follows_threads_cpus_and_concurrent_trainers(tmp_path):
    def policy(node_cpus=2, concurrent=1, **sections):
        return ray_worker_policy(tiny_experiment(tmp_path, **sections), node_cpus, concurrent)[:2]

    assert policy(train={"threads": 1}, dist={"workers": 2, "cpus_per_worker": 1}) == ("spin", 1)
    assert policy(train={"threads": 2}, dist={"workers": 2, "cpus_per_worker": 1}) == ("passive", 2)
    # threads 0: one per reserved CPU; one worker owning the node (the worker-per-node layout)
    assert policy(train={"threads": 0}, dist={"workers": 1, "cpus_per_worker": 2}) == ("spin", 2)
    assert policy(8, train={"threads": 0}, dist={"workers": 4, "cpus_per_worker": 8}) == ("spin", 8)
    # a sweep: two 1-worker trials of 2 threads on 1 reserved CPU each share the two cores; one alone does not
    assert policy(concurrent=2, train={"threads": 2}, dist={"workers": 1, "cpus_per_worker": 1})[0] == "passive"
    assert policy(concurrent=1, train={"threads": 2}, dist={"workers": 1, "cpus_per_worker": 1})[0] == "spin"
    assert policy(train={"threads": 1, "wait_policy": "passive"}, dist={"workers": 2})[0] == "passive"


def test_local_policy_uses_this_machines_cpus(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert local_policy(tiny_experiment(tmp_path, train={"threads": cpus}), busy_cores=0.0)[:2] == ("spin", cpus)
    assert local_policy(tiny_experiment(tmp_path, train={"threads": cpus + 1}), busy_cores=0.0)[0] == "passive"


def test_auto_counts_cores_other_processes_keep_busy():
    assert choose_wait_policy("auto", 2, 1, 2, busy_cores=0.3)[0] == "spin"  # a passing command, not a job
    policy, why = choose_wait_policy("auto", 2, 1, 2, busy_cores=0.9)
    assert policy == "passive" and "0.9 of them busy with other processes" in why
    assert choose_wait_policy("auto", 1, 1, 2, busy_cores=1.0)[0] == "spin"  # one thread, one free core
    assert choose_wait_policy("spin", 2, 1, 2, busy_cores=1.0)[0] == "spin"  # the user's word wins


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux /proc/stat")
def test_a_busy_neighbour_is_measured_and_makes_a_local_run_sleep(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYLESS_RAY_BUSY_CORES", raising=False)
    cpus = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past its start-up
        assert other_processes_cores(0.5) > 0.6
        policy, _, why = local_policy(tiny_experiment(tmp_path, train={"threads": cpus}))
    finally:
        busy.kill()
        busy.wait()
    assert policy == "passive" and "busy with other processes" in why
    assert float(os.environ["PROXYLESS_RAY_BUSY_CORES"]) > 0.6  # what a re-executed copy of the process reuses


def test_wait_policy_is_validated_and_overridable(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\n")
    assert load_experiment(path).train.wait_policy == "auto"
    assert load_experiment(path, ["train.wait_policy=passive"]).train.wait_policy == "passive"
    with pytest.raises(ValueError, match=r"train.wait_policy 'sleepy' is unknown; expected one of \['auto', "):
        load_experiment(path, ["train.wait_policy=sleepy"])
    assert WAIT_POLICIES == ("auto", "spin", "passive")


def _run(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_KEYS}
    env["PYTHONPATH"] = ROOT
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


# OMP_DISPLAY_ENV makes libgomp print, when torch loads it, the policy it will use: what the process really runs
SHOW = "import os, sys; os.environ['OMP_DISPLAY_ENV'] = 'verbose'; "


def test_policy_set_before_torch_loads_is_the_one_libgomp_reads():
    code = SHOW + ("from proxyless_ray.runtime import ensure_thread_env; print(ensure_thread_env('passive'), "
                   "flush=True); import torch; torch.ones(1)")
    env = {**{k: v for k, v in os.environ.items() if k not in THREAD_ENV_KEYS}, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.startswith("True")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr
    assert "GOMP_SPINCOUNT = '0'" in out.stderr


def test_after_torch_the_command_line_re_executes_itself_with_the_policy_and_a_library_caller_does_not():
    code = ("import os, torch; from proxyless_ray.runtime import ensure_thread_env; "
            "print('start', os.environ.get('OMP_WAIT_POLICY'), flush=True); "
            "print('in force', ensure_thread_env('passive', reexec={reexec}), os.environ.get('OMP_WAIT_POLICY'))")
    # the library caller: torch already read the variables, so nothing changes and it says so
    assert _run(code.format(reexec=False), {"OMP_WAIT_POLICY": "ACTIVE"}).splitlines() == [
        "start ACTIVE", "in force False ACTIVE"]
    # the command line: the same process image starts again, now with the policy, and goes on
    assert _run(code.format(reexec=True), {"OMP_WAIT_POLICY": "ACTIVE"}).splitlines() == [
        "start ACTIVE", "start PASSIVE", "in force True PASSIVE"]


def test_local_run_logs_its_choice_and_whether_it_is_in_force(tmp_path, monkeypatch, capsys):
    import torch  # noqa: F401  (loaded: libgomp read this process's variables already)

    exp = tiny_experiment(tmp_path, train={"threads": 1, "wait_policy": "passive"})
    for key, value in thread_env(False).items():
        monkeypatch.setenv(key, value)
    settle_local_threads(exp, reexec=False)
    line = capsys.readouterr().err
    assert "this process: 1 torch thread(s), OpenMP threads passive (OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0)" in line
    assert "train.wait_policy: passive" in line and "NOT in force" in line
    assert os.environ["OMP_WAIT_POLICY"] == thread_env(False)["OMP_WAIT_POLICY"]  # untouched: it would lie
    for key, value in thread_env(True).items():
        monkeypatch.setenv(key, value)
    settle_local_threads(exp, reexec=False)
    assert "NOT in force" not in capsys.readouterr().err
