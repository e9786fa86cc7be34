"""The per-worker search loop in-process: an end-to-end tiny search on real Fashion-MNIST, resume, outputs."""

import json
import os

import pytest
import torch

from proxyless_ray.distributed.trainer import latest_checkpoint, run_local
from proxyless_ray.nn.arch import Arch
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.search.state import load_checkpoint, new_state

from conftest import requires_fmnist, tiny_experiment

pytestmark = requires_fmnist


@pytest.mark.parametrize("mode", ["two", "full_v2", "reinforce"])
def test_tiny_search_end_to_end(tmp_path, mode):
    exp = tiny_experiment(tmp_path, train={"gate_mode": mode})
    result = run_local(exp, echo=False)
    out = exp.output_dir
    for name in ("arch.json", "searched_arch.json", "result.json", "metrics.jsonl", "alphas.json",
                 "network/model.pt2", "network/state_dict.pt", "network/arch.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    arch = Arch.load(os.path.join(out, "arch.json"))
    assert "zero" not in arch.blocks() and arch.meta["profile"] == "flops"
    assert 0.0 <= result["test_acc"] <= 1.0 and result["latency_ms"] > 0
    assert abs(sum(r["ms"] for r in result["per_layer_ms"]) - result["latency_ms"]) < 1e-9
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[0]["phase"] == "warmup" and lines[1]["phase"] == "search"
    for key in ("train_loss", "train_acc", "heldout_acc", "expected_latency_ms", "entropy", "arch", "images_per_s"):
        assert key in lines[-1]
    program = torch.export.load(os.path.join(out, "network", "model.pt2"))
    assert program.module()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_arch_steps_move_alpha_only_after_warmup(tmp_path):
    exp = tiny_experiment(tmp_path, train={"epochs": 2, "warmup_epochs": 1, "arch_lr": 0.05})
    seen = []
    loop = SearchLoop(exp, Comm(), lambda m, f: seen.append(m), progress=False)
    a0 = [a.detach().clone() for a in loop.state.net.arch_parameters()]
    loop.run(until_epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(a0, loop.state.net.arch_parameters()))  # frozen in warm-up
    loop.run()
    assert loop.state.arch_step == 2  # 4 steps per epoch, one arch step every 2
    assert not all(torch.equal(a, b) for a, b in zip(a0, loop.state.net.arch_parameters()))


def test_resume_continues_a_stopped_run(tmp_path):
    exp = tiny_experiment(tmp_path, train={"epochs": 3})
    from proxyless_ray.distributed.trainer import LocalReporter

    reporter = LocalReporter(exp.output_dir, echo=False)
    SearchLoop(exp, Comm(), reporter, progress=False).run(until_epoch=2)  # "stopped" after epoch 2
    ckpt = latest_checkpoint(exp.output_dir)
    assert ckpt.endswith("epoch-0002")
    result = run_local(exp, resume=True, echo=False)
    history = [json.loads(x)["epoch"] for x in open(os.path.join(exp.output_dir, "metrics.jsonl"))]
    assert history == [1, 2, 3] and result["epochs"] == 3
    # the same run from scratch reaches the same state: resume restores RNG, optimizers and counters
    fresh = tiny_experiment(tmp_path / "fresh", train={"epochs": 3})
    run_local(fresh, echo=False)
    a = torch.load(os.path.join(latest_checkpoint(exp.output_dir), "state.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(latest_checkpoint(fresh.output_dir), "state.pt"), weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_checkpoint_from_other_space_refused(tmp_path):
    exp = tiny_experiment(tmp_path)
    run_local(exp, echo=False)
    other = tiny_experiment(tmp_path, space={"kernel_sizes": [3]})
    with pytest.raises(ValueError, match="written for search space .* refusing to load"):
        load_checkpoint(new_state(other), latest_checkpoint(exp.output_dir), other)
    separate = tiny_experiment(tmp_path, train={"weight_sharing": "separate"})
    with pytest.raises(ValueError, match="holds a supernet with 'nested' weights.*weight_sharing: nested"):
        load_checkpoint(new_state(separate), latest_checkpoint(exp.output_dir), separate)


def test_finetune_after_search_is_reported_apart(tmp_path):
    exp = tiny_experiment(tmp_path, train={"finetune_epochs": 1})
    result = run_local(exp, echo=False)
    assert result["finetune_epochs"] == 1
    assert 0.0 <= result["inherited_test_acc"] <= 1.0 and 0.0 <= result["test_acc"] <= 1.0
    lines = [json.loads(x) for x in open(os.path.join(exp.output_dir, "metrics.jsonl"))]
    assert "inherited_test_acc" in lines[-1] and "test_acc" in lines[-1]


def test_heldout_accuracy_reads_the_derived_network_and_leaves_the_supernet_alone(tmp_path):
    from proxyless_ray.search.evaluate import accuracy, derived_network

    exp = tiny_experiment(tmp_path, train={"epochs": 1, "warmup_epochs": 1})
    seen = []
    loop = SearchLoop(exp, Comm(), lambda m, f: seen.append(m), progress=False)
    loop.run()
    net = loop.state.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    child = loop._inherited_child(net.argmax_choices())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # supernet statistics untouched
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG stream a resume replays is untouched
    acc, _ = accuracy(child, loop.splits.heldout, Comm(), exp.data.eval_batch_size)
    assert seen[-1]["heldout_acc"] == pytest.approx(acc)
    # the public reading (what benchmarks rank sub-networks by): the argmax by default, or the given choices
    assert loop.heldout_accuracy() == pytest.approx(acc)
    other = [(c + 1) % len(s.candidates) for c, s in zip(net.argmax_choices(), net.slots)]
    other_acc, _ = accuracy(loop._inherited_child(other), loop.splits.heldout, Comm(), exp.data.eval_batch_size)
    assert loop.heldout_accuracy(other) == pytest.approx(other_acc)
    first, _ = accuracy(child, loop.splits.heldout, Comm(), exp.data.eval_batch_size, max_batches=1)
    assert loop.heldout_accuracy(max_batches=1) == pytest.approx(first)
    # the supernet's own mixed statistics would read another number: the child has its own
    stale = derived_network(net, net.argmax_choices())
    stale_bn = [m.running_mean for m in stale.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    own_bn = [m.running_mean for m in child.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.allclose(a, b) for a, b in zip(stale_bn, own_bn))


def test_bn_recal_batches_sets_the_batches_a_child_is_recalibrated_on(tmp_path):
    """``train.bn_recal_batches`` batches re-estimate the child's statistics: the child equals one recalibrated by
    hand on that many batches, and differs from the default's 20."""
    from proxyless_ray.search.evaluate import derived_network, recalibrate_bn

    exp = tiny_experiment(tmp_path, train={"epochs": 1, "warmup_epochs": 1, "bn_recal_batches": 2})
    loop = SearchLoop(exp, Comm(), lambda m, f: None, progress=False)
    choices = loop.state.net.argmax_choices()
    child = loop._inherited_child(choices)

    def by_hand(batches: int) -> dict[str, torch.Tensor]:
        net = derived_network(loop.state.net, choices, channels_last=exp.train.channels_last)
        recalibrate_bn(net, loop.splits.train, Comm(), exp.data.batch_size, batches, exp.train.seed,
                       channels_last=exp.train.channels_last)
        return net.state_dict()

    two, twenty = by_hand(2), by_hand(20)
    assert all(torch.equal(v, two[k]) for k, v in child.state_dict().items())
    assert any(not torch.equal(v, twenty[k]) for k, v in child.state_dict().items())


def test_final_metrics_test_the_last_epochs_child_as_a_fresh_recalibration_would(tmp_path):
    """The final metrics reuse the child the last epoch recalibrated for its held-out reading: it is the network a
    recalibration after the search gives, weights and BN statistics bit for bit, and its test accuracy."""
    from proxyless_ray.search.evaluate import accuracy

    exp = tiny_experiment(tmp_path, train={"epochs": 2, "warmup_epochs": 1})
    seen = []
    loop = SearchLoop(exp, Comm(), lambda m, f: seen.append(m), progress=False)
    loop.run()
    fresh = loop._inherited_child(loop.state.net.argmax_choices())
    kept = loop.derived.state_dict()
    assert kept.keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, kept[k]) for k, v in fresh.state_dict().items())
    assert seen[-1]["test_acc"] == accuracy(fresh, loop.splits.test, Comm(), exp.data.eval_batch_size)[0]
    assert loop._last_child is None  # not held after the search


def test_unreachable_readiness_postpones_arch_steps_then_decides_with_a_message(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, train={"epochs": 4, "warmup_epochs": 1, "ready_acc": 0.99, "ready_samples": 1,
                                           "arch_lr": 0.05})
    seen = []
    loop = SearchLoop(exp, Comm(), lambda m, f: seen.append(m), progress=False)
    a0 = [a.detach().clone() for a in loop.state.net.arch_parameters()]
    loop.run(until_epoch=2)
    assert [m["searching"] for m in seen] == [False, False]  # the warm-up, then one epoch postponed
    assert all(torch.equal(a, b) for a, b in zip(a0, loop.state.net.arch_parameters()))
    assert seen[0]["supernet_ready"] is False and 0 <= seen[0]["subnet_heldout_acc"] < 0.99
    assert "not ready" in capsys.readouterr().err
    loop.run()
    assert [m["searching"] for m in seen] == [False, False, True, True]  # half the search epochs, then it decides
    assert "still not ready after 2 epochs" in capsys.readouterr().err
    assert seen[-1]["supernet_ready"] is False and seen[-1]["ready_subnet_acc"] == seen[1]["subnet_heldout_acc"]


def test_reached_readiness_starts_arch_steps_after_the_warmup(tmp_path):
    exp = tiny_experiment(tmp_path, train={"epochs": 2, "warmup_epochs": 1, "ready_acc": 0.01, "ready_samples": 2})
    seen = []
    SearchLoop(exp, Comm(), lambda m, f: seen.append(m), progress=False).run()
    assert [m["searching"] for m in seen] == [False, True] and seen[-1]["supernet_ready"] is True


@pytest.mark.parametrize("method", ["uniform_depth", "fair", "sandwich", "largest_first"])
def test_warmup_methods_train_and_search(tmp_path, method):
    exp = tiny_experiment(tmp_path, train={"warmup_method": method})
    result = run_local(exp, echo=False)
    assert 0.0 <= result["test_acc"] <= 1.0


def test_warmup_reads_its_own_larger_subset(tmp_path):
    exp = tiny_experiment(tmp_path, data={"warmup_subset": 512}, train={"max_steps_per_epoch": 0})
    loop = SearchLoop(exp, Comm(), lambda m, f: None, progress=False)
    assert len(loop.warmup_source) == 512 and len(loop.splits.train) == 256
    assert loop.warmup_steps_per_epoch == 16 and loop.steps_per_epoch == 8
    # the search's images are a prefix of the warm-up's: the held-out split stays disjoint from both
    assert torch.equal(loop.warmup_source.images[:256], loop.splits.train.images)
