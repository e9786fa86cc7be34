"""Experiment configs: every shipped file loads; unknown keys, bad values and overrides."""

import glob
import os
import re

import pytest

from proxyless_ray.config import Experiment, flatten, load_experiment, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.yaml")))


def test_experiments_exist():
    names = {os.path.basename(p) for p in EXPERIMENTS}
    assert "fashion_mnist.yaml" in names
    assert {"imagenet_gpu.yaml", "imagenet_cpu.yaml", "imagenet_mobile.yaml"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_loads_and_round_trips(path):
    exp = load_experiment(path)
    assert Experiment.from_dict(exp.to_dict()) == exp
    with open(path) as fh:
        assert fh.readline().startswith("# "), "experiments open with a one-line comment saying what they are for"


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  epohcs: 3\n")
    with pytest.raises(ValueError, match=r"exp\.yaml: unknown key\(s\) \['train\.epohcs'\]"):
        load_experiment(p)
    p = write(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['trian'\]"):
        load_experiment(p)


def test_overrides_and_lambda_alias(tmp_path):
    p = write(tmp_path, "latency:\n  lambda: 0.3\n")
    exp = load_experiment(p, ["train.epochs=3", "space.kernel_sizes=[3, 5]", "latency.lambda=0.5"])
    assert exp.train.epochs == 3 and exp.space.kernel_sizes == (3, 5) and exp.latency.lam == 0.5
    assert exp.name == "exp"
    assert flatten(exp.to_dict())["train.epochs"] == 3
    # one name for the coefficient: the plain dict (Ray configs, MLflow params) keys it as the YAML file does
    assert flatten(exp.to_dict())["latency.lambda"] == 0.5 and "latency.lam" not in flatten(exp.to_dict())
    assert Experiment.from_dict(exp.to_dict()) == exp
    assert with_overrides(exp, latency={"lambda": 0.7}).latency.lam == 0.7


def test_the_old_name_of_lambda_is_read_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match=r"latency\.lam is the old name of latency\.lambda; write latency\.lambda"):
        exp = load_experiment(write(tmp_path, "latency:\n  lam: 0.3\n"))
    assert exp.latency.lam == 0.3
    with pytest.raises(ValueError, match=r"latency\.lambda and latency\.lam are both given"):
        load_experiment(write(tmp_path, "latency:\n  lam: 0.3\n"), ["latency.lambda=0.5"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['latency\.lamda'\]; expected .*'latency\.lambda'"):
        load_experiment(write(tmp_path, "latency:\n  lamda: 0.3\n"))


@pytest.mark.parametrize("override,fragment", [
    ("latency.lambda=-0.1", "latency.lambda must be >= 0, got -0.1"),
    ("latency.target_ms=-5", "latency.target_ms must be > 0 for mul_log"),
    ("train.gate_mode=three", "train.gate_mode 'three' is unknown"),
    ("train.epochs=abc", "train.epochs must be a number, got 'abc'"),
    ("train.bn_recal_batches=0", "train.bn_recal_batches must be >= 1, got 0"),
    ("train.bn_recal_batches=2.5", "train.bn_recal_batches must be an integer, got 2.5"),
    ("space.kernel_sizes=[3, 4]", "kernel size 4"),
    ("space.strides=[1, 3, 2, 1]", "stride 3"),
    ("sweep.scheduler=hyperband", "sweep.scheduler 'hyperband' does not exist"),
    ("space.preset=tiny", "space.preset 'tiny' is unknown"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_values_are_named(tmp_path, override, fragment):
    p = write(tmp_path, "name: x\nlatency:\n  loss: mul_log\n")
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_experiment(p, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")
    p = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_experiment(p)
    p = write(tmp_path, "!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError):  # safe_load refuses arbitrary objects
        load_experiment(p)


@pytest.mark.parametrize("override, message", [
    ("train.warmup_method=spos", "train.warmup_method 'spos' is unknown; expected one of"),
    ("train.weight_sharing=shared", "train.weight_sharing 'shared' is unknown"),
    ("train.ready_acc=1.5", "train.ready_acc must be in [0, 1)"),
    ("data.warmup_subset=10", "must be 0 or >= data.train_subset"),
])
def test_search_quality_settings_are_checked(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_experiment("experiments/fashion_mnist.yaml", [override])


def test_cli_refuses_an_unknown_warmup_method_in_one_line_with_the_valid_names(tmp_path, capsys):
    from proxyless_ray.cli import main

    rc = main(["search", "experiments/demo.yaml", "--set", "train.warmup_method=spos", "--no-tracking",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "'spos'" in err[0] and "uniform" in err[0] and "sandwich" in err[0]
    assert not os.listdir(tmp_path)


def test_every_numeric_field_has_a_range():
    """A new numeric field needs an entry in RANGES (or a check of its own in validate / SearchSpace)."""
    from dataclasses import fields

    from proxyless_ray.config import _SECTIONS, Experiment
    from proxyless_ray.config_checks import RANGES

    checked_elsewhere = {"latency.lam", "latency.ref_ms", "latency.target_ms", "latency.beta", "space.widths",
                         "space.depths", "space.strides", "space.kernel_sizes", "space.exp_ratios",
                         "space.feature_mix_chs", "sweep.betas", "sweep.targets_ms"}
    exp = Experiment()
    missing = []
    for section in _SECTIONS:
        for f in fields(getattr(exp, section)):
            value = getattr(getattr(exp, section), f.name)
            sample = next(iter(value.values() if isinstance(value, dict) else value), 0.0) \
                if isinstance(value, (tuple, dict)) else value
            numeric = "float" in str(f.type) or "int" in str(f.type)
            if numeric and not isinstance(sample, bool) and f"{section}.{f.name}" not in RANGES:
                missing.append(f"{section}.{f.name}")
    assert sorted(set(missing) - checked_elsewhere) == []


def test_every_registered_data_set_has_a_reader():
    from proxyless_ray.choices import DATASETS
    from proxyless_ray.data import READERS

    assert tuple(READERS) == DATASETS
