"""Retraining a derived network: from arch.json (scratch and fine-tune), measured latency, and bad input."""

import json
import os

import pytest
import torch

from proxyless_ray.cli import main
from proxyless_ray.config import Experiment
from proxyless_ray.distributed.retrain import measure_latency_ms, resolve_arch, run_retrain
from proxyless_ray.distributed.trainer import run_local
from proxyless_ray.nn.arch import Arch

from conftest import requires_fmnist, tiny_experiment

pytestmark = requires_fmnist


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    exp = tiny_experiment(tmp)
    run_local(exp, echo=False)
    return exp


def test_retrain_from_scratch_and_finetune(searched, tmp_path):
    exp = tiny_experiment(tmp_path)
    arch_path = os.path.join(searched.output_dir, "arch.json")
    result = run_retrain(exp, arch_path, epochs=1)
    assert 0.0 <= result["test_acc"] <= 1.0 and result["epochs"] == 1
    assert result["measured_cpu_latency_ms"] > 0 and result["predicted_latency_ms"] > 0
    assert os.path.isfile(os.path.join(result["out_dir"], "network", "model.pt2"))
    with open(os.path.join(result["out_dir"], "result.json")) as fh:
        assert json.load(fh)["arch"] == Arch.load(arch_path).arch_string()
    # fine-tuning starts from the exported network's weights
    tuned = run_retrain(exp, os.path.join(searched.output_dir, "network"), finetune=True, epochs=1, lr=1e-9)
    scratch_free = run_retrain(exp, os.path.join(searched.output_dir, "network"), finetune=False, epochs=1, lr=1e-9)
    with open(os.path.join(searched.output_dir, "result.json")) as fh:
        inherited = json.load(fh)["test_acc"]
    # lr ~ 0: a fine-tune keeps the inherited accuracy up to BN-statistics drift; scratch stays near chance
    assert abs(tuned["test_acc"] - inherited) < 0.15 or tuned["test_acc"] > scratch_free["test_acc"]


def test_measure_latency_counts_repeats():
    arch = Arch("conv_k3_c8_s2", (("mb_k3_e3_c8_s1",),), None, 10, 28, 1)
    from proxyless_ray.nn.network import ProxylessNet

    m = measure_latency_ms(ProxylessNet(arch), arch, min_time_s=0.05, repeats=10)
    assert m["count"] >= 10 and m["median_ms"] > 0 and m["threads"] == 1
    assert torch.get_num_threads() >= 1


def test_arch_from_other_input_shape_refused_before_training(searched, tmp_path):
    arch = Arch.load(os.path.join(searched.output_dir, "arch.json"))
    rgb = Arch(arch.stem, arch.stages, arch.feature_mix, arch.num_classes, 32, 3, name="rgb32")
    path = tmp_path / "rgb.json"
    rgb.save(path)
    exp = tiny_experiment(tmp_path)
    with pytest.raises(ValueError, match=r"gives 1x28x28 images but the network expects 3x32x32"):
        run_retrain(exp, str(path), epochs=1)
    assert not os.path.exists(os.path.join(exp.output_dir, "retrained"))


def test_unknown_sources_and_missing_data(searched, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_arch(str(tmp_path / "nope.json"))
    cfg = tmp_path / "e.yaml"
    cfg.write_text("# t\ntracking:\n  enabled: false\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["train", "--arch", "models:/proxyless-nowhere/3", str(cfg), "--workers", "0", "--tracking-uri", uri,
            "--set", "tracking.enabled=true"]
    assert main(argv) == 2
    assert "no MLflow database" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()  # not created
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # the store exists; the model does not
    assert main(argv) == 2
    assert "proxyless-nowhere" in capsys.readouterr().err
    arch_path = os.path.join(searched.output_dir, "arch.json")
    assert main(["train", "--arch", arch_path, str(cfg), "--workers", "0", "--data", str(tmp_path / "no_data"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST folder" in err and "no_data" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_parallel_fine_tunes_on_ray_match_one_in_process(searched, tmp_path):
    """The demo's side-by-side fine-tunes (Ray tasks) give what the same fit gives in this process, file for file."""
    from proxyless_ray.demo import _descendants, _running, fit_in_parallel
    from proxyless_ray.distributed.retrain import fit_network, measure_retrained
    from proxyless_ray.latency.target import target_of
    from proxyless_ray.nn.network import load_network

    exp = tiny_experiment(tmp_path)
    spec = os.path.join(searched.output_dir, "network")
    jobs = [(f"trial{i}", Experiment.from_dict({**exp.to_dict(), "name": f"trial{i}"}), spec) for i in range(2)]
    before = _descendants(os.getpid())
    # trial0's task gets the target resolved here (pickled into it), trial1's resolves its own
    targets = {"trial0": target_of(jobs[0][1])}
    remote = fit_in_parallel(exp, jobs, epochs=1, lr=0.01, targets=targets)
    # its latency measurements follow: the Ray processes it started have exited when it returns
    assert not [pid for pid in _descendants(os.getpid()) - before if _running(pid)]
    assert sorted(remote) == ["trial0", "trial1"]
    local = fit_network(Experiment.from_dict({**exp.to_dict(), "out_dir": str(tmp_path / "local")}), spec,
                        finetune=True, epochs=1, lr=0.01)
    for tid in remote:
        assert remote[tid]["test_acc"] == local["test_acc"] and f"/{tid}/" in remote[tid]["out_dir"]
        a = load_network(os.path.join(remote[tid]["out_dir"], "network")).state_dict()
        b = load_network(os.path.join(local["out_dir"], "network")).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(remote["trial0"]["out_dir"], "result.json"))  # measured later, here
    result = measure_retrained(jobs[0][1], remote["trial0"], target=targets["trial0"])
    assert result["measured_cpu_latency_ms"] > 0
    with open(os.path.join(remote["trial0"]["out_dir"], "result.json")) as fh:
        assert json.load(fh)["test_acc"] == local["test_acc"]
