"""Supernet: derive -> rebuild equivalence, weight inheritance, export round trip."""

import pytest
import torch

from proxyless_ray.nn.network import ProxylessNet, export_network, load_network
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.nn.supernet import SuperNet

SPACE = SearchSpace(widths=(8, 16), depths=(2, 2), strides=(1, 2), feature_mix_chs=32)


def trained_supernet(seed=0, steps=3, sharing="separate"):
    torch.manual_seed(seed)
    net = SuperNet(SPACE, weight_sharing=sharing)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 2)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # a few steps so BN statistics and weights are not at their init values
        net.sample_single(g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    return net


@pytest.mark.parametrize("sharing", ["separate", "nested"])
def test_rebuilt_network_matches_supernet_with_argmax_gates(sharing):
    for seed in range(3):
        net = trained_supernet(seed, sharing=sharing)
        arch = net.derive().without_zeros()
        child = ProxylessNet(arch)
        child.load_state_dict(net.derived_state_dict())  # strict: every key of the child is inherited
        net.set_argmax()
        net.eval()
        child.eval()
        x = torch.randn(4, 1, 28, 28)
        torch.testing.assert_close(child(x), net(x))


def test_derived_arch_drops_zero_layers():
    net = trained_supernet()
    zero_layers = [m for m in net.mixed_ops() if m.zero_index >= 0]
    with torch.no_grad():
        zero_layers[0].alpha.fill_(-5)
        zero_layers[0].alpha[zero_layers[0].zero_index] = 5
    searched = net.derive()
    assert "zero" in searched.blocks()
    assert "zero" not in searched.without_zeros().blocks()
    n_zero = searched.blocks().count("zero")
    assert len(ProxylessNet(searched.without_zeros()).blocks) == len(searched.blocks()) - n_zero


def test_export_round_trip(tmp_path):
    net = trained_supernet()
    child = ProxylessNet(net.derive().without_zeros())
    child.load_state_dict(net.derived_state_dict())
    child.eval()
    paths = export_network(child, tmp_path / "network")
    x = torch.randn(1, 1, 28, 28)
    back = load_network(tmp_path / "network")
    torch.testing.assert_close(back(x), child(x))
    program = torch.export.load(paths["program"])
    torch.testing.assert_close(program.module()(x), child(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_without_the_program_holds_what_load_network_reads(tmp_path):
    net = trained_supernet()
    child = ProxylessNet(net.derive().without_zeros())
    child.load_state_dict(net.derived_state_dict())
    child.eval()
    paths = export_network(child, tmp_path / "network", program=False)
    assert sorted(paths) == ["arch", "state_dict"]
    assert sorted(p.name for p in (tmp_path / "network").iterdir()) == ["arch.json", "state_dict.pt"]
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(load_network(tmp_path / "network")(x), child(x), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_entropy_falls_as_alpha_sharpens():
    net = SuperNet(SPACE)
    h0 = net.entropy()
    with torch.no_grad():
        for a in net.arch_parameters():
            a[0] = 10
    assert net.entropy() < 0.1 < h0


def test_weight_parameters_are_every_parameter_but_alpha_and_follow_swapped_tensors():
    net = SuperNet(SPACE)
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    expected = [p for name, p in net.named_parameters() if not name.endswith(".alpha")]
    assert ids(net.weight_parameters()) == ids(expected) and len(expected) > len(net.arch_parameters())
    net.weight_parameters().clear()  # callers get a list of their own
    assert len(net.weight_parameters()) == len(expected)
    # load_state_dict(assign=True) and conversions with overwritten parameters swap the objects: the walk follows
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    assert ids(net.weight_parameters()) == ids(p for n, p in net.named_parameters() if not n.endswith(".alpha"))
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        net.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    weights = net.weight_parameters()
    assert ids(weights) == ids(p for n, p in net.named_parameters() if not n.endswith(".alpha"))
    assert all(p.dtype == torch.float64 for p in weights)


@pytest.mark.parametrize("model", ["supernet", "child"])
def test_an_nchw_training_step_computes_the_channels_last_step(model):
    # train.channels_last false keeps NCHW parameters and batches but computes in channels-last on CPU (oneDNN's
    # NCHW depthwise kernels are slow): the same loss and gradients as the channels-last model, NCHW gradients
    import copy

    from proxyless_ray.nn.mixed_op import GateMode

    torch.manual_seed(0)
    net = SuperNet(SPACE, weight_sharing="nested")
    if model == "child":
        net = ProxylessNet(net.derive([0] * len(net.mixed_ops())).without_zeros())
    else:
        net.sample_for_arch(GateMode.FULL_V2, torch.Generator().manual_seed(0))
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    layouts = []
    stem = set(net.stem.modules())  # a 1-channel batch is both layouts: the stem's conv keeps NCHW
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and m not in stem):
        bn.register_forward_pre_hook(lambda mod, args: layouts.append(args[0].is_contiguous(
            memory_format=torch.channels_last)))
    losses = []
    for m, batch in ((net, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(m(batch), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    assert layouts and all(layouts)  # the NCHW model's layers saw channels-last activations
    for (name, p), q in zip(net.named_parameters(), cl.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        assert p.is_contiguous() and p.grad.is_contiguous(), name
    # inference keeps the batch's layout (latency measurement and exported networks see the layers as built)
    from proxyless_ray.nn.ops import training_layout

    assert training_layout(x).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert training_layout(x) is x
