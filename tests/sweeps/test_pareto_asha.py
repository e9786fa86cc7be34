"""Pareto ASHA on synthetic trial streams (no Ray cluster), plus runs through real Tune (asynchronous and with a
synchronous first rung)."""

from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest

from proxyless_ray.sweeps.pareto_asha import COMPLETE, ParetoASHAScheduler, config_value

CONT, STOP = "CONTINUE", "STOP"


def trial(trial_id: str, hardware: str = "pixel1", **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"hardware": hardware, **config})


def report(sched: ParetoASHAScheduler, t: SimpleNamespace, epoch: float, acc: float, lat: float) -> str:
    return sched.on_trial_result(None, t, {"epoch": epoch, "heldout_acc": acc, "expected_latency_ms": lat})


def make(**kwargs) -> ParetoASHAScheduler:
    kwargs = {"max_t": 8, "grace_period": 1, "reduction_factor": 2, **kwargs}
    return ParetoASHAScheduler(**kwargs)


def test_rungs():
    assert make(max_t=6).rungs == (1, 2, 4)
    assert make(max_t=8).rungs == (1, 2, 4, 8)
    assert ParetoASHAScheduler(max_t=9, grace_period=1, reduction_factor=3).rungs == (1, 3, 9)
    assert ParetoASHAScheduler(max_t=10, grace_period=2, reduction_factor=2).rungs == (2, 4, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"grace_period": 0}, "grace_period"), ({"max_t": 0.5}, "max_t"), ({"reduction_factor": 1}, "reduction_factor"),
    ({"group_by": 3}, "group_by")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_dominated_stopped_non_dominated_continue():
    sched = make()
    ta, tb, tc, td, te = (trial(x) for x in "abcde")
    assert report(sched, ta, 1, 0.9, 10.0) == CONT  # alone at the rung
    assert report(sched, tb, 1, 0.8, 20.0) == STOP  # dominated by a: n=2, keep=1, 1 better
    assert report(sched, td, 1, 0.85, 15.0) == CONT  # rank 1 behind a only: n=3, keep=2, 1 better
    assert report(sched, tc, 1, 0.95, 30.0) == CONT  # more accurate, slower: non-dominated
    assert report(sched, te, 1, 0.5, 50.0) == STOP  # rank 3: n=5, keep=3, 4 better (a, c, d, b)
    assert sched.records()["pixel1"]["1"]["b"] == {"acc": 0.8, "lat": 20.0, "decision": STOP}


def test_decisions_only_at_rungs_and_never_revisited():
    sched = make()
    ta, tb = trial("a"), trial("b")
    assert report(sched, ta, 1, 0.9, 10.0) == CONT
    assert report(sched, tb, 1, 0.8, 20.0) == STOP
    # b reports again at rung 1 (e.g. a resumed trial): same answer, no second record.
    assert report(sched, tb, 1.5, 0.99, 1.0) == STOP
    assert report(sched, ta, 1.5, 0.1, 99.0) == CONT
    assert sched.records()["pixel1"]["1"]["a"]["acc"] == 0.9
    # A trial that skips rungs is recorded at the highest one it reached.
    tc = trial("c")
    assert report(sched, tc, 3, 0.5, 5.0) == CONT
    assert set(sched.records()["pixel1"]) == {"1", "2"}
    assert "c" in sched.records()["pixel1"]["2"]


def test_equal_points_share_a_rank():
    sched = make()
    for name in "abc":
        assert report(sched, trial(name), 1, 0.8, 10.0) == CONT  # identical points never dominate each other
    # The cut falls between ranks: rank 0 = {p}, rank 1 = {x, y}, identical; both continue or both stop.
    recorded = {"p": {"acc": 0.9, "lat": 5.0}, "x": {"acc": 0.7, "lat": 9.0}, "y": {"acc": 0.7, "lat": 9.0},
                "z": {"acc": 0.1, "lat": 90.0}}
    assert sched._decide(recorded, "x") == sched._decide(recorded, "y") == CONT  # n=4, keep=2, 1 better
    assert sched._decide(recorded, "z") == STOP
    more = dict(recorded, q={"acc": 0.95, "lat": 6.0}, r={"acc": 0.99, "lat": 8.0})  # two more on the front
    assert sched._decide(more, "x") == sched._decide(more, "y") == STOP  # n=6, keep=3, 3 better


def test_trials_that_report_once_or_reach_max_t():
    sched = make(max_t=6)
    early = trial("early")
    assert report(sched, early, 0.5, 0.1, 100.0) == CONT  # before the grace period: nothing recorded
    assert sched.records() == {}
    # A one-report trial that finishes at its first rung is ranked like any other.
    once = trial("once")
    assert report(sched, once, 1, 0.9, 10.0) == CONT
    sched.on_trial_complete(None, once, {"epoch": 1, "heldout_acc": 0.9, "expected_latency_ms": 10.0})
    assert sched.records()["pixel1"]["1"]["once"]["decision"] == CONT
    # A result only seen at completion is recorded as COMPLETE, and later trials are ranked against it.
    quiet = trial("quiet")
    sched.on_trial_complete(None, quiet, {"epoch": 2, "heldout_acc": 0.95, "expected_latency_ms": 5.0})
    assert sched.records()["pixel1"]["2"]["quiet"]["decision"] == COMPLETE
    assert report(sched, trial("late"), 2, 0.5, 50.0) == STOP
    sched.on_trial_complete(None, trial("never"), None)  # no result at all
    # Reaching max_t stops (stop_last_trials), without recording anything new.
    long = trial("long")
    assert report(sched, long, 6, 0.99, 1.0) == STOP
    assert "long" not in str(sched.records())
    assert make(max_t=6, stop_last_trials=False).on_trial_result(
        None, long, {"epoch": 6, "heldout_acc": 0.1, "expected_latency_ms": 1.0}) == CONT


def test_results_without_time_or_metrics_continue_unrecorded():
    sched = make()
    t = trial("a")
    assert sched.on_trial_result(None, t, {"training_iteration": 3, "heldout_acc": 0.5}) == CONT
    assert sched.on_trial_result(None, t, {"epoch": 2, "loss": 1.0}) == CONT
    assert sched.records() == {}


def test_hardware_groups_never_compared():
    sched = make()
    assert report(sched, trial("g", "gpu"), 1, 0.99, 1.0) == CONT
    assert report(sched, trial("p1", "pixel1"), 1, 0.5, 100.0) == CONT  # dominated by gpu's trial, alone in pixel1
    assert report(sched, trial("p2", "pixel1"), 1, 0.4, 200.0) == STOP
    assert report(sched, trial("g2", "gpu"), 1, 0.6, 2.0) == STOP  # dominated by g, not saved by pixel1's trials
    assert sorted(sched.records()) == ["gpu", "pixel1"]


def test_group_by_dotted_key_and_callable():
    nested = SimpleNamespace(trial_id="n", config={"sweep": {"hw": "tpu"}})
    sched = make(group_by="sweep.hw")
    sched.on_trial_add(None, nested)
    report(sched, nested, 1, 0.5, 1.0)
    assert list(sched.records()) == ["tpu"]
    sched = make(group_by=lambda config: config["sweep"]["hw"].upper())
    report(sched, nested, 1, 0.5, 1.0)
    assert list(sched.records()) == ["TPU"]
    assert config_value({"a.b": 1, "a": {"b": 2}}, "a.b") == 1
    with pytest.raises(ValueError, match="cannot group by 'hardware'.*sweep"):
        make().on_trial_add(None, nested)


STREAM = [("a", "pixel1", 1, 0.9, 10.0), ("b", "pixel1", 1, 0.8, 20.0), ("g", "gpu", 1, 0.7, 2.0),
          ("a", "pixel1", 2, 0.92, 10.0), ("c", "pixel1", 1, 0.95, 25.0), ("h", "gpu", 1, 0.6, 3.0),
          ("c", "pixel1", 2, 0.96, 25.0)]
LATER = [("d", "pixel1", 1, 0.85, 8.0), ("d", "pixel1", 2, 0.97, 9.0), ("i", "gpu", 1, 0.75, 1.5),
         ("g", "gpu", 2, 0.8, 2.0), ("i", "gpu", 2, 0.7, 2.5), ("b", "pixel1", 1, 0.8, 20.0)]


def _play(sched: ParetoASHAScheduler, stream) -> list[str]:
    return [report(sched, trial(tid, hw), ep, acc, lat) for tid, hw, ep, acc, lat in stream]


def test_state_survives_a_new_instance_and_unpickling(tmp_path):
    path = tmp_path / "pareto_state.json"
    sched = make(state_path=path)
    pickled_before = pickle.dumps(sched)  # what Tuner writes to tuner.pkl before the sweep runs
    _play(sched, STREAM)
    state = json.loads(path.read_text())
    assert state["records"] == sched.records() and state["num_stopped"] == 2
    reborn, unpickled = make(state_path=path), pickle.loads(pickled_before)
    assert reborn.records() == unpickled.records() == sched.records()
    assert reborn.debug_string() == sched.debug_string()
    # The state file is a snapshot: play the rest into a copy of the file for each scheduler.
    decisions = []
    for i, s in enumerate((sched, reborn, unpickled)):
        copy_path = tmp_path / f"copy{i}.json"
        copy_path.write_text(path.read_text())
        s._state_path = str(copy_path)
        decisions.append(_play(s, LATER))
    assert decisions[0] == decisions[1] == decisions[2]
    assert STOP in decisions[0] and CONT in decisions[0]
    assert decisions[0][-1] == STOP  # b was stopped at rung 1 before the "restore"


def test_state_from_other_settings_is_refused(tmp_path):
    path = tmp_path / "not_yet" / "state.json"  # the folder is created on the first write
    _play(make(state_path=path), STREAM)
    with pytest.raises(ValueError, match="settings differ.*reduction_factor"):
        make(state_path=path, reduction_factor=3)
    with pytest.raises(ValueError, match="rungs"):
        make(state_path=path, max_t=1)  # rung "2" no longer exists
    make(state_path=path, max_t=4)  # fewer rungs, but all recorded ones still exist


def test_debug_string():
    sched = make()
    _play(sched, STREAM)
    text = sched.debug_string()
    assert "num_stopped=2" in text
    assert "pixel1: epoch 1: 3 recorded, 1 stopped | epoch 2: 2 recorded, 0 stopped" in text
    assert "gpu: epoch 1: 2 recorded, 1 stopped" in text


class FakeController:
    """The two things the scheduler asks of Tune's controller: its trials, and stopping one."""

    def __init__(self, sched: ParetoASHAScheduler, trials: list[SimpleNamespace]):
        self.sched, self.trials, self.stopped = sched, trials, []

    def get_trials(self) -> list[SimpleNamespace]:
        return self.trials

    def stop_trial(self, t: SimpleNamespace) -> None:
        assert t.status in ("PAUSED", "PENDING")
        t.status = "TERMINATED"
        self.stopped.append(t.trial_id)
        self.sched.on_trial_remove(self, t)


def sync_setup(**kwargs):
    sched = make(group_sizes={"pixel1": 4, "gpu": 2}, **kwargs)
    trials = {tid: trial(tid, hw) for tid, hw in [("d", "pixel1"), ("a", "pixel1"), ("b", "pixel1"),
                                                   ("c", "pixel1"), ("e", "gpu"), ("f", "gpu")]}
    for t in trials.values():
        t.status = "PENDING"
    tc = FakeController(sched, list(trials.values()))
    for t in trials.values():
        sched.on_trial_add(tc, t)
    return sched, trials, tc


def sync_report(sched, tc, t, epoch, acc, lat) -> str:
    t.status = "RUNNING"
    decision = sched.on_trial_result(tc, t, {"epoch": epoch, "heldout_acc": acc, "expected_latency_ms": lat})
    t.status = {"PAUSE": "PAUSED", "STOP": "TERMINATED"}.get(decision, "RUNNING")
    return decision


def test_synchronous_first_rung_decides_the_whole_group_at_once(tmp_path):
    sched, tr, tc = sync_setup(state_path=tmp_path / "state.json")
    assert sched.synchronous_first_rung and not make().synchronous_first_rung
    # d is first and worst: asynchronous halving would let it pass (alone at the rung); here it waits.
    assert sync_report(sched, tc, tr["d"], 1, 0.5, 50.0) == "PAUSE"
    assert sched.choose_trial_to_run(tc) is tr["a"]  # pending trials go first; a waiting trial is never chosen
    assert sync_report(sched, tc, tr["a"], 1, 0.9, 10.0) == "PAUSE"
    assert sync_report(sched, tc, tr["e"], 1, 0.7, 1.0) == "PAUSE"  # another group, other records
    assert sync_report(sched, tc, tr["b"], 1, 0.8, 20.0) == "PAUSE"
    assert sched.records()["pixel1"]["1"]["b"]["decision"] == "WAIT"
    assert json.loads((tmp_path / "state.json").read_text())["records"]["pixel1"]["1"]["d"]["decision"] == "WAIT"
    # c completes pixel1: n=4, keep=2; ranks a 0, c 1, b 2, d 3.
    assert sync_report(sched, tc, tr["c"], 1, 0.85, 15.0) == CONT
    recs = sched.records()["pixel1"]["1"]
    assert {i: r["decision"] for i, r in recs.items()} == {"a": CONT, "b": STOP, "c": CONT, "d": STOP}
    assert tc.stopped == ["d", "b"] and tr["b"].status == tr["d"].status == "TERMINATED"
    assert sched.choose_trial_to_run(tc) is tr["f"]  # the pending gpu trial before resuming a
    tr["f"].status = "RUNNING"
    assert sched.choose_trial_to_run(tc) is tr["a"]  # paused, told to continue
    tr["a"].status = "RUNNING"
    assert sched.choose_trial_to_run(tc) is None  # e waits for f
    # Later rungs stay asynchronous.
    assert sync_report(sched, tc, tr["a"], 2, 0.95, 9.0) == CONT
    # f fails before the first rung: e is decided alone and resumed.
    tr["f"].status = "ERROR"
    sched.on_trial_error(tc, tr["f"])
    assert sched.records()["gpu"]["1"]["e"]["decision"] == CONT
    assert sched.choose_trial_to_run(tc) is tr["e"]
    assert sched.debug_string().count("stopped") == 4 and "num_stopped=2" in sched.debug_string()


def test_synchronous_first_rung_after_a_restore(tmp_path):
    path = tmp_path / "state.json"
    sched, tr, tc = sync_setup(state_path=path)
    assert sync_report(sched, tc, tr["d"], 1, 0.5, 50.0) == "PAUSE"
    assert sync_report(sched, tc, tr["a"], 1, 0.9, 10.0) == "PAUSE"
    # The driver dies; Tune restores the unfinished trials as PENDING and the scheduler rereads its records.
    sched2 = make(group_sizes={"pixel1": 4, "gpu": 2}, state_path=path)
    for t in tr.values():
        t.status = "PENDING"
    tc2 = FakeController(sched2, list(tr.values()))
    assert sched2.choose_trial_to_run(tc2) is tr["b"]  # d and a wait for their group
    # Tune may still start a waiting trial; it resumes past the rung and is told to wait again.
    assert sync_report(sched2, tc2, tr["d"], 2, 0.6, 40.0) == "PAUSE"
    assert "d" not in sched2.records()["pixel1"].get("2", {})
    assert sync_report(sched2, tc2, tr["b"], 1, 0.8, 20.0) == "PAUSE"
    assert sync_report(sched2, tc2, tr["c"], 1, 0.85, 15.0) == CONT
    assert tc2.stopped == ["d", "b"]


def test_synchronous_first_rung_is_forced_when_nothing_can_run():
    sched, tr, tc = sync_setup()
    tc.trials = [tr["e"]]  # f was never created (e.g. the trial queue is capped), and e waits
    assert sync_report(sched, tc, tr["e"], 1, 0.7, 1.0) == "PAUSE"
    assert sched.choose_trial_to_run(tc) is tr["e"]  # nothing runs or is pending: decided with what is there
    assert sched.records()["gpu"]["1"]["e"]["decision"] == CONT
    with pytest.raises(ValueError, match="group 'tpu' is not in group_sizes"):
        sched.on_trial_add(tc, trial("x", "tpu"))
    with pytest.raises(ValueError, match="group_sizes"):
        make(group_sizes={"gpu": 0})


@pytest.mark.ray
@pytest.mark.slow
def test_pareto_asha_through_tune(tmp_path):
    import ray
    import ray.cloudpickle
    from ray import tune

    def synthetic_trainable(config):
        p = config["p"]
        for epoch in range(1, 7):  # accuracy rises towards its final value; latency is fixed by the architecture
            tune.report({"epoch": epoch, "heldout_acc": p["acc"] * (1 - 0.5**epoch), "expected_latency_ms": p["lat"]})

    # Per hardware: two front members, then two trials dominated by both. Trials start in grid order (FIFO), so the
    # front members are recorded at the rungs first.
    profiles = []
    for kind, acc, lat in [("front", 0.9, 20.0), ("front", 0.8, 10.0), ("dominated", 0.7, 25.0),
                           ("dominated", 0.6, 30.0)]:
        for hw, scale in [("pixel1", 1.0), ("gpu", 0.1)]:
            profiles.append({"hw": hw, "kind": kind, "acc": acc, "lat": lat * scale})
    state_path = tmp_path / "pareto_state.json"
    sched = ParetoASHAScheduler(group_by="p.hw", max_t=8, grace_period=1, reduction_factor=2, state_path=state_path)
    ray.init(num_cpus=2, resources={"driver_slot": 8}, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(synthetic_trainable, {"driver_slot": 1}),
            param_space={"p": tune.grid_search(profiles)},
            tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=2),
            run_config=tune.RunConfig(name="pareto_asha", storage_path=str(tmp_path / "runs"), verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    assert grid.num_errors == 0
    epochs = {(r.config["p"]["hw"], r.config["p"]["kind"], r.config["p"]["lat"]): r.metrics["epoch"] for r in grid}
    assert len(epochs) == 8
    for (hw, kind, _), epoch in epochs.items():
        assert epoch == (6 if kind == "front" else 1), (hw, kind, epochs)
    state = json.loads(state_path.read_text())
    assert sorted(state["records"]) == ["gpu", "pixel1"]
    assert state["num_stopped"] == 4
    for hw in ("gpu", "pixel1"):
        assert len(state["records"][hw]["1"]) == 4 and len(state["records"][hw]["4"]) == 2
    # Tuner.restore unpickles the scheduler from tuner.pkl, as it was before the sweep: it must reread the file.
    with open(tmp_path / "runs" / "pareto_asha" / "tuner.pkl", "rb") as fh:
        restored = ray.cloudpickle.load(fh)["_tune_config"].scheduler
    assert restored.records() == state["records"]


@pytest.mark.ray
@pytest.mark.slow
def test_synchronous_first_rung_through_tune(tmp_path):
    """Real Tune: paused trials release their slot, resume from their checkpoint, and nobody passes rung 1 early."""
    import tempfile
    import time

    import ray
    from ray import tune

    def resumable_trainable(config):
        p, start = config["p"], 1
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder, open(os.path.join(folder, "epoch.json")) as fh:
                start = json.load(fh)["epoch"] + 1
        for epoch in range(start, 5):
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, "epoch.json"), "w") as fh:
                    json.dump({"epoch": epoch}, fh)
                tune.report({"epoch": epoch, "heldout_acc": p["acc"] * (1 - 0.5**epoch),
                             "expected_latency_ms": p["lat"], "wall": time.time()},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    # Dominated trials first: an asynchronous first rung would let them pass (nobody to compare with yet).
    profiles = [{"hw": hw, "kind": kind, "acc": acc, "lat": lat * scale}
                for kind, acc, lat in [("dominated", 0.6, 30.0), ("dominated", 0.7, 25.0), ("front", 0.9, 20.0),
                                       ("front", 0.8, 10.0)]
                for hw, scale in [("pixel1", 1.0), ("gpu", 0.1)]]
    sched = ParetoASHAScheduler(group_by="p.hw", max_t=4, grace_period=1, reduction_factor=2,
                                group_sizes={"pixel1": 4, "gpu": 4}, state_path=tmp_path / "state.json")
    ray.init(num_cpus=2, resources={"driver_slot": 2}, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune.Tuner(
            tune.with_resources(resumable_trainable, {"driver_slot": 1}),  # 2 slots cap the running trials
            param_space={"p": tune.grid_search(profiles)},
            tune_config=tune.TuneConfig(scheduler=sched),
            run_config=tune.RunConfig(name="sync_rung", storage_path=str(tmp_path / "runs"), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert grid.num_errors == 0
    first_rung_done, resumed = {}, {}
    for r in grid:
        p, rows = r.config["p"], r.metrics_dataframe.sort_values("wall")
        epochs = rows["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1)), (p, epochs)  # resumed where it paused, nothing twice
        assert len(epochs) == (4 if p["kind"] == "front" else 1), (p, epochs)
        wall = dict(zip(rows["epoch"], rows["wall"]))
        first_rung_done[p["hw"]] = max(first_rung_done.get(p["hw"], 0.0), wall[1])
        if 2 in wall:
            resumed.setdefault(p["hw"], []).append(wall[2])
    for hw, times in resumed.items():
        assert min(times) > first_rung_done[hw], hw  # no trial went on before its whole group reached rung 1
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["num_stopped"] == 4
    assert {rec["decision"] for g in state["records"].values() for rec in g["1"].values()} == {CONT, STOP}
