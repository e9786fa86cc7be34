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
    ThreadGovernor,
    choose_wait_policy,
    local_policy,
    other_processes_cores,
    ray_worker_policy,
    thread_env,
    threads_for,
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


@pytest.mark.parametrize(("others", "cpus", "threads", "expected"), [
    (0.0, 2, 2, 2), (0.1, 2, 2, 2), (0.5, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1),
    (1.0, 8, 8, 7), (1.0, 8, 4, 4), (3.2, 8, 8, 5)])
def test_threads_for_leaves_out_the_cores_others_take(others, cpus, threads, expected):
    assert threads_for(others, cpus, threads) == expected


class FakeMachine:
    """/proc/stat as a reader sees it: this process uses ``own`` cores, other processes ``others``."""

    def __init__(self):
        self.others, self.own, self.t, self.busy_s, self.own_s = 0.0, 2.0, time.perf_counter(), 0.0, 0.0

    def read(self):
        now = time.perf_counter()
        self.busy_s += (self.others + self.own) * (now - self.t)
        self.own_s += self.own * (now - self.t)
        self.t = now
        return self.busy_s, self.own_s


def test_thread_governor_drops_to_the_free_cores_and_comes_back(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    torch.set_num_threads(2)
    said, machine = [], FakeMachine()
    try:
        gov = ThreadGovernor(True, every_s=0.02, say=said.append, reader=machine.read, cpus=2)
        assert gov.enabled
        time.sleep(0.03)
        gov.tick()
        assert torch.get_num_threads() == 2 and not said  # quiet: both threads stay
        machine.others, machine.own = 1.0, 1.0  # another job takes a core
        time.sleep(0.03)
        gov.tick()
        assert torch.get_num_threads() == 1 and "1.0 of 2 cores busy: 1 torch thread(s), were 2" in said[-1]
        time.sleep(0.005)
        gov.tick()  # within every_s: nothing read, nothing changed
        assert len(said) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)  # a nested loop (the search's fine-tune) sets its own count
        time.sleep(0.03)
        gov.tick()
        assert torch.get_num_threads() == 1 and len(said) == 2  # the other job is still there
        machine.others = 0.0  # it ends
        time.sleep(0.03)
        gov.tick()
        assert torch.get_num_threads() == 2 and gov.changes == [(1.0, 1), (1.0, 1), (0.0, 2)]
        machine.others = 1.0
        time.sleep(0.03)
        gov.tick()
        assert torch.get_num_threads() == 1
        gov.restore()  # the end of a run: the next one in this process starts with every thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("policy", "threads", "adapt"), [("PASSIVE", 2, True), ("ACTIVE", 1, True),
                                                          ("ACTIVE", 2, False)])
def test_thread_governor_stays_out_where_it_cannot_help(monkeypatch, policy, threads, adapt):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    torch.set_num_threads(threads)
    machine = FakeMachine()
    machine.others = 1.0
    try:
        gov = ThreadGovernor(adapt, every_s=0.0, reader=machine.read, cpus=2)
        time.sleep(0.01)
        gov.tick()
        assert not gov.enabled and torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("adapt", [True, False])
def test_a_search_beside_a_busy_machine_runs_on_the_cores_left_and_gives_them_back(tmp_path, monkeypatch, capsys,
                                                                                   adapt):
    import torch

    import proxyless_ray.runtime as rt
    from proxyless_ray.search.comm import Comm
    from proxyless_ray.search.loop import SearchLoop

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = FakeMachine()
    machine.others, machine.own = float(cpus - 1), 1.0  # every core but one taken by other processes
    monkeypatch.setattr(rt, "_busy_and_own_s", machine.read)
    monkeypatch.setattr(rt, "GOVERNOR_EVERY_S", 0.0)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    before = torch.get_num_threads()
    threads_at_report = []
    try:
        exp = tiny_experiment(tmp_path, train={"threads": 2, "adapt_threads": adapt})
        SearchLoop(exp, Comm(), lambda m, f: threads_at_report.append(torch.get_num_threads()), progress=False).run()
        assert threads_at_report == ([1, 1] if adapt else [2, 2])
        assert ("1 torch thread(s), were 2" in capsys.readouterr().err) == adapt
        assert torch.get_num_threads() == 2  # the run's end restores them
    finally:
        torch.set_num_threads(before)
