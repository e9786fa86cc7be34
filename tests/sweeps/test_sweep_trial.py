"""Sweep trials of one worker in their Tune actor: reused processes compute what fresh ones do, through pauses at
the synchronous first rung and a trial killed mid-epoch and retried from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from proxyless_ray.config import Experiment
from proxyless_ray.sweeps.plan import TrialSpec

from conftest import TINY_SPACE, requires_fmnist

pytestmark = [requires_fmnist]

KEYS = ("epoch", "train_loss", "heldout_acc", "alpha_digest", "expected_latency_ms")


def sweep_experiment(tmp_path, **sweep) -> Experiment:
    return Experiment.from_dict({
        "name": "reuse", "out_dir": str(tmp_path / "runs"), "space": dict(TINY_SPACE),
        "data": {"train_subset": 1024, "heldout_size": 128, "test_subset": 256, "batch_size": 32,
                 "eval_batch_size": 128},
        "train": {"epochs": 4, "warmup_epochs": 1, "arch_update_every": 2, "max_steps_per_epoch": 24, "threads": 1,
                  "channels_last": False, "arch_lr": 0.05, "ready_samples": 0},
        "dist": {"max_failures": 1, "checkpoint_every": 1},
        "sweep": {"hardware": ["pixel1"], "lambdas": [0.01, 0.1, 1.0], "grace_period": 1, "reduction_factor": 2,
                  "max_concurrent_trials": 1, **sweep},
        "tracking": {"enabled": False},
    })


def trial_config(exp: Experiment, spec: TrialSpec, sweep_dir: str, warmup: str | None) -> dict:
    """What run_sweep hands a trial (the Ray boundary: plain dicts)."""
    return {"trial": spec.to_dict(), "experiment": exp.to_dict(), "sweep_dir": sweep_dir,
            "warmup_checkpoint": warmup, "latency_profiles": {}}


def run_uninterrupted(config: dict) -> list[dict]:
    """A trial's per-epoch metrics, run here in one go (no Tune, no pause)."""
    from proxyless_ray.sweeps.trial import fresh_trial_loop, trial_of

    exp, _, _ = trial_of(config)
    seen: list[dict] = []
    fresh_trial_loop(exp, config, lambda m, folder: seen.append({k: m[k] for k in KEYS})).run()
    return seen


FRESH = """
import json, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]  # this test's folder, and tests/ for conftest
from test_sweep_trial import run_uninterrupted
print(json.dumps(run_uninterrupted(json.loads(open(sys.argv[1]).read()))))
"""


def test_a_reused_process_computes_what_a_fresh_one_does(tmp_path):
    """Two trials in this process (the first with other seeds, threads and coefficients), the second again in a
    fresh interpreter: the same metrics and architecture logits, bit for bit."""
    exp = sweep_experiment(tmp_path)
    other = Experiment.from_dict({**exp.to_dict(), "train": {**exp.to_dict()["train"], "seed": 7, "threads": 2}})
    sweep_dir = str(tmp_path / "runs" / "reuse")
    first = trial_config(other, TrialSpec("v100_roofline", "add", lam=3.0), sweep_dir, None)
    second = trial_config(exp, TrialSpec("pixel1", "add", lam=0.1), sweep_dir, None)
    run_uninterrupted(first)
    reused = run_uninterrupted(second)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(second))
    out = subprocess.run([sys.executable, "-c", FRESH, str(path), os.path.dirname(__file__),
                          os.path.dirname(os.path.dirname(__file__))], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m["epoch"] for m in reused] == [1, 2, 3, 4]
    assert reused == fresh


def tune_results(sweep_dir, key: str) -> list[dict]:
    path = sweep_dir / "tune" / key / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the line being written
            pass
    return rows


def checkpoint_epochs(sweep_dir, key: str) -> list[int]:
    """The epochs of a trial's checkpoints that Tune has persisted whole (their ``meta.json`` reads)."""
    epochs = []
    for meta in (sweep_dir / "tune" / key).glob("checkpoint_*/meta.json"):
        try:
            epochs.append(int(json.loads(meta.read_text())["epoch"]))
        except (OSError, ValueError, KeyError):  # being written, or removed by checkpoints_to_keep
            pass
    return epochs


@pytest.mark.ray
@pytest.mark.slow
def test_paused_and_killed_trials_resume_in_reused_processes_with_the_uninterrupted_result(tmp_path):
    """Pareto sweep, one trial at a time: two trials pause at the synchronous first rung and at least one of them
    resumes (two of three go on); the first trial to reach its second search epoch is SIGKILLed in its last epoch
    and retried from its checkpoint. Every epoch every trial reported equals that trial run here without pause or
    kill, and the trials share processes (one actor serves several trials)."""
    from proxyless_ray.sweeps.plan import load_plan, sweep_grid
    from proxyless_ray.sweeps.sweep import run_sweep

    exp = sweep_experiment(tmp_path, scheduler="pareto")
    sweep_dir = tmp_path / "runs" / "reuse"
    keys = [spec.key for spec in sweep_grid(exp)]
    killed: dict[str, int] = {}
    stop = threading.Event()

    def kill(key: str, pid: int, sign: str) -> None:
        os.kill(pid, signal.SIGKILL)
        killed[key] = pid
        print(f"killed {key} (pid {pid}) on its {sign}", flush=True)  # shown when the test fails

    def killer():
        # Tune's result.json can get a trial's epoch-3 row after its epoch 4 is over (on a fast, quiet machine it did,
        # for every trial of a run), so the first sign is the epoch-3 checkpoint the trial itself persists; the
        # process to kill is then the one every trial so far reported from (one trial runs at a time, in a reused
        # actor). The row stays the sign when the trials reported from several processes.
        while not stop.is_set() and not killed:
            pids = {r["pid"] for key in keys for r in tune_results(sweep_dir, key)}
            for key in keys:
                rows = tune_results(sweep_dir, key)
                saved = checkpoint_epochs(sweep_dir, key)
                if 4 in saved:  # too late for this trial: its last epoch is over
                    continue
                if rows and rows[-1].get("epoch") == 3:  # its epoch-3 checkpoint is saved; epoch 4 is under way
                    kill(key, rows[-1]["pid"], "epoch-3 row")
                    break
                if len(pids) == 1 and saved and max(saved) == 3:
                    time.sleep(0.2)  # past the report of epoch 3, into epoch 4
                    kill(key, pids.pop(), "epoch-3 checkpoint")
                    break
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_sweep(exp)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert summary["errors"] == 0 and summary["finished"] >= 1, summary
    assert killed, "no trial was killed"
    (key, pid), = killed.items()
    plan = load_plan(str(sweep_dir))
    pids: dict[str, set[int]] = {}
    restarts = 0  # results right after a restart from a checkpoint (a resume after the pause, or the retry)
    for spec in plan.trials:
        rows = tune_results(sweep_dir, spec.key)
        epochs = [r["epoch"] for r in rows]
        assert epochs == list(range(2, 2 + len(epochs))), (spec.key, epochs)  # nothing lost, nothing twice
        pids[spec.key] = {r["pid"] for r in rows}
        restarts += sum(r["epoch"] > 2 and r["iterations_since_restore"] == 1 for r in rows)
        reference = run_uninterrupted(trial_config(exp, spec, str(sweep_dir), plan.warmup_checkpoint))
        assert [{k: r[k] for k in KEYS} for r in rows] == reference[:len(rows)], spec.key
    assert restarts >= 2
    assert tune_results(sweep_dir, key)[-1]["epoch"] == 4 and tune_results(sweep_dir, key)[-1]["pid"] != pid
    # one trial at a time, so one process at a time: the trials share processes instead of one each
    assert len(set().union(*pids.values())) < sum(len(p) for p in pids.values())
