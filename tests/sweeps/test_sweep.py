"""A real sweep (Ray Tune over Ray Train trials): killed mid-way, resumed, and its Pareto report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import yaml

from proxyless_ray.cli import main
from proxyless_ray.config import Experiment

from conftest import TINY_SPACE, requires_fmnist

pytestmark = [pytest.mark.ray, pytest.mark.slow, requires_fmnist]


def write_config(tmp_path, scheduler="pareto", steps=4, images=256, hardware=("pixel1", "v100_roofline")):
    cfg = {
        "name": "sweep",
        "out_dir": str(tmp_path / "runs"),
        "space": TINY_SPACE,
        "data": {"train_subset": images, "heldout_size": 128, "test_subset": 256, "batch_size": 32,
                 "eval_batch_size": 128},
        "train": {"epochs": 4, "warmup_epochs": 1, "arch_update_every": 2, "max_steps_per_epoch": steps, "threads": 1,
                  "channels_last": False, "arch_lr": 0.05},
        "sweep": {"hardware": list(hardware), "lambdas": [0.5], "scheduler": scheduler,
                  "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text("# test sweep\n" + yaml.safe_dump(cfg))
    return path, tmp_path / "runs" / "sweep"


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its embedded Ray included): no orphans left behind."""
    sid = os.getsid(proc.pid)
    victims = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == sid]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_sweep_killed_then_resumed_reports_the_pareto_front(tmp_path):
    """One trial per hardware, one at a time: the driver is killed once the first trial finished and before the
    second could, so the resumed sweep must keep the first and run the second (synchronous rungs through real Tune
    are tested in test_pareto_asha.py, paused and retried trials in reused processes in test_sweep_trial.py). Trials
    of a few seconds each, so the kill falls between the two."""
    cfg, sweep_dir = write_config(tmp_path, steps=24, images=1024)
    cmd = [sys.executable, "-m", "proxyless_ray.cli", "sweep", str(cfg)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished_before: dict[str, float] = {}
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            trials = sweep_dir / "trials"
            done = [p for p in trials.glob("*/result.json")] if trials.exists() else []
            if done:
                finished_before = {p.parent.name: p.stat().st_mtime for p in done}
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + open(log.name).read()[-3000:]
        assert len(finished_before) == 1, f"expected one finished trial at the kill, got {finished_before}"
        records_before = json.loads((sweep_dir / "scheduler_state.json").read_text())["records"]
    finally:
        kill_session(proc)
        killed_at = time.time()
        log.close()
    assert records_before, "the Pareto scheduler recorded rungs before the kill"

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # finished trials were not rerun, nor their Train runs restarted
    for name, mtime in finished_before.items():
        assert (sweep_dir / "trials" / name / "result.json").stat().st_mtime == mtime, name
    assert "resumed from checkpoint at epoch 4" not in resumed.stdout + resumed.stderr
    # the scheduler's rung records survived the restore (it reloaded them, then kept adding)
    records_after = json.loads((sweep_dir / "scheduler_state.json").read_text())["records"]
    for group, rungs in records_before.items():
        for rung, trials in rungs.items():
            assert set(trials) <= set(records_after[group][rung])
    # the report: one row per trial, a front per hardware, files written, readable terminal table
    table = pd.read_parquet(sweep_dir / "pareto.parquet")
    assert sorted(table["trial_id"]) == ["pixel1-add-lam0.5", "v100_roofline-add-lam0.5"]
    for hw in ("pixel1", "v100_roofline"):
        assert table[(table["hardware"] == hw) & table["on_front"]].shape[0] == 1
    status = dict(zip(table["trial_id"], table["status"]))
    assert set(status.values()) == {"finished"}, status  # the one finished before the kill too (Tune missed its end)
    # the trial the kill interrupted ran to its end after the resume
    rest = [p for p in (sweep_dir / "trials").glob("*/result.json") if p.parent.name not in finished_before]
    assert len(rest) == 1 and rest[0].stat().st_mtime > killed_at
    assert {"latency_pixel1_ms", "latency_v100_roofline_ms", "latency_cpu_1thread_ms", "arch"} <= set(table.columns)
    assert (sweep_dir / "pareto.csv").is_file() and (sweep_dir / "pareto.png").is_file()
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["shared_warmup"]
    assert "== pixel1 ==" in resumed.stdout and "== v100_roofline ==" in resumed.stdout
    assert len((resumed.stdout + resumed.stderr).splitlines()) < 600  # progress stays readable


def test_workers_per_trial_beyond_the_cluster(tmp_path, capsys):
    cfg, _ = write_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["sweep"]["workers_per_trial"] = 64
    cfg.write_text("# t\n" + yaml.safe_dump(data))
    assert main(["sweep", str(cfg)]) == 2  # in this process: a subprocess would add ~8 s of imports
    assert "64 workers x 1 CPU need 64 CPU" in capsys.readouterr().err


def test_trials_hold_a_share_of_the_driver_slots(tmp_path):
    """Running trials are capped by a resource (paused trials hold none), else by max_concurrent_trials; a trial of
    one worker computes in its own actor and holds that worker's CPUs (GPUs), a Train driver none."""
    from proxyless_ray.sweeps.sweep import trial_resources

    cfg, _ = write_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())

    def sweep(dist=None, **values):
        return Experiment.from_dict({**data, "sweep": {**data["sweep"], **values}, "dist": dist or {}})

    embedded = {"CPU": 2.0, "driver_slot": 64.0}  # what run_sweep's embedded cluster has
    assert trial_resources(sweep(max_concurrent_trials=2), embedded) == ({"driver_slot": 32.0, "CPU": 1.0}, None)
    assert trial_resources(sweep(max_concurrent_trials=2, workers_per_trial=2), embedded) == ({"driver_slot": 32.0},
                                                                                              None)
    share, cap = trial_resources(sweep(max_concurrent_trials=3), embedded)
    assert cap is None and 3 * share["driver_slot"] <= 64 < 4 * share["driver_slot"]
    # unset: as many trials as the CPUs (or GPUs) hold their workers
    assert trial_resources(sweep(max_concurrent_trials=0, workers_per_trial=2), {"CPU": 8.0, "driver_slot": 64.0}) \
        == ({"driver_slot": 16.0}, None)
    gpus = sweep({"gpus_per_worker": 1, "cpus_per_worker": 2}, max_concurrent_trials=0)
    assert trial_resources(gpus, {"CPU": 16.0, "GPU": 2.0, "driver_slot": 64.0}) \
        == ({"driver_slot": 32.0, "CPU": 2.0, "GPU": 1.0}, None)
    # a cluster without driver slots (started by hand): capped by max_concurrent_trials; a Train driver takes a
    # sliver of a CPU
    assert trial_resources(sweep(max_concurrent_trials=2), {"CPU": 2.0}) == ({"CPU": 1.0}, 2)
    assert trial_resources(sweep(max_concurrent_trials=2, workers_per_trial=2), {"CPU": 2.0}) == ({"CPU": 0.01}, 2)


def test_ctrl_c_stops_the_sweep_and_says_how_to_resume(tmp_path):
    """Ctrl-C at a terminal (SIGINT to the process group) during the first trial: Tune's handler stops the sweep and
    returns from fit as if it had ended; the driver says so, marks the folder and writes no report, exit 130."""
    import signal

    cfg, sweep_dir = write_config(tmp_path, hardware=["pixel1"])  # one trial: the one the signal reaches
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "proxyless_ray.cli", "sweep", str(cfg)], stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=tmp_path)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("[sweep") and " epoch " in line:  # the first trial reported its first epoch
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    last = [x for x in rest.splitlines() if x.startswith("proxyless-ray sweep: interrupted")]
    assert code == 130 and len(last) == 1, "".join(seen)[-2000:] + rest[-3000:]
    assert "SIGINT" in last[0] and str(sweep_dir / "tune") in last[0] and f"sweep {cfg} --resume" in last[0]
    assert (sweep_dir / "INCOMPLETE").exists()
    assert not (sweep_dir / "pareto.csv").exists() and not (sweep_dir / "summary.json").exists()
    # the command it printed finishes the sweep (trials the signal reached resume as errored ones)
    done = subprocess.run([sys.executable, "-m", "proxyless_ray.cli", "sweep", str(cfg), "--resume"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep_dir / "summary.json").exists() and not (sweep_dir / "INCOMPLETE").exists()
