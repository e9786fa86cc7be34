"""The sweep plan: grid expansion and its bad-input errors, trial experiments, the saved plan (no Ray needed)."""

import pytest

from proxyless_ray.cli import main
from proxyless_ray.sweeps.plan import TrialSpec, load_plan, sweep_grid, trial_experiment, warmup_key

from conftest import tiny_experiment


def test_add_grid_is_hardware_times_lambdas(tmp_path):
    exp = tiny_experiment(tmp_path, sweep={"hardware": ["pixel1", "v100_roofline"], "lambdas": [0.1, 1.0, 3.0]})
    trials = sweep_grid(exp)
    assert [t.key for t in trials] == ["pixel1-add-lam0.1", "pixel1-add-lam1", "pixel1-add-lam3",
                                       "v100_roofline-add-lam0.1", "v100_roofline-add-lam1", "v100_roofline-add-lam3"]
    t = trial_experiment(exp, trials[4], str(tmp_path / "sw"))
    assert (t.latency.profile, t.latency.lam, t.name) == ("v100_roofline", 1.0, "v100_roofline-add-lam1")


def test_mul_log_targets_per_hardware(tmp_path):
    targets = {"pixel1": [5, 10], "v100_roofline": [1]}
    exp = tiny_experiment(tmp_path, sweep={"hardware": ["pixel1", "v100_roofline"], "loss": "mul_log",
                                           "betas": [0.3, 0.6], "targets_ms": targets})
    trials = sweep_grid(exp)
    assert len(trials) == 6
    assert TrialSpec("pixel1", "mul_log", beta=0.6, target_ms=10.0) in trials
    assert {t.target_ms for t in trials if t.hardware == "v100_roofline"} == {1.0}


def test_log_sampling_is_seeded_and_in_range(tmp_path):
    exp = tiny_experiment(tmp_path, sweep={"hardware": ["pixel1"], "lambdas": [0.01, 1.0], "sampling": "log",
                                           "num_samples": 5})
    a, b = sweep_grid(exp), sweep_grid(exp)
    assert a == b and len(a) == 5
    assert all(0.01 <= t.lam <= 1.0 for t in a)


def test_warmup_key_ignores_hardware_and_coefficients(tmp_path):
    a = tiny_experiment(tmp_path, latency={"profile": "pixel1", "lambda": 0.1})
    b = tiny_experiment(tmp_path, latency={"profile": "v100_roofline", "lambda": 3.0})
    c = tiny_experiment(tmp_path, train={"seed": 1})
    assert warmup_key(a) == warmup_key(b) != warmup_key(c)


@pytest.mark.parametrize("sweep,error,fragment", [
    ({"hardware": []}, ValueError, "sweep.hardware is empty"),
    ({"hardware": ["pixel1"], "lambdas": []}, ValueError, "the sweep grid is empty"),
    ({"hardware": ["pixel1", "tpu_v9"], "lambdas": [0.1]}, FileNotFoundError, "tpu_v9"),
    ({"hardware": ["pixel1"], "lambdas": [0.0, 1.0], "sampling": "log"}, ValueError,
     r"coefficients must be > 0 on a log scale"),
    ({"hardware": ["pixel1"], "loss": "mul_log", "targets_ms": {"pixel1": [-1]}}, ValueError,
     "target latencies must be > 0 ms"),
    ({"hardware": ["pixel1"], "loss": "mul_log", "targets_ms": {}}, ValueError, "no latency targets for hardware"),
])
def test_bad_grids(tmp_path, sweep, error, fragment):
    exp = tiny_experiment(tmp_path, sweep=sweep)
    with pytest.raises(error, match=fragment):
        sweep_grid(exp)


def test_cli_bad_sweep_exits_2_before_ray(tmp_path, capsys):
    cfg = tmp_path / "sw.yaml"
    cfg.write_text("# test\nsweep:\n  hardware: [pixel1]\n  lambdas: []\ntracking:\n  enabled: false\n")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "the sweep grid is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    cfg.write_text("# test\nsweep:\n  hardware: [pixel1]\n  lambdas: [0.1]\n  scheduler: hyperband\n")
    assert main(["sweep", str(cfg)]) == 2
    assert "sweep.scheduler 'hyperband' does not exist" in capsys.readouterr().err


def test_resume_of_a_folder_without_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        load_plan(str(tmp_path))


def test_trial_spec_round_trips_through_its_dict():
    from dataclasses import asdict

    from proxyless_ray.sweeps.plan import TrialSpec

    for spec in (TrialSpec("pixel1", "add", lam=0.1), TrialSpec("gpu", "mul_log", beta=0.6, target_ms=5.0)):
        assert TrialSpec.from_dict(asdict(spec)) == spec
