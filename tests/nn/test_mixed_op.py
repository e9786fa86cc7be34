"""Binary gates: BinaryConnect gradients, rescaling, REINFORCE, single-path weight steps, zero semantics."""

import copy

import pytest
import torch

from proxyless_ray.nn.mixed_op import Forward, GateMode, MixedOp, WeightSharing, binary_connect_grad, reinforce_grad
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.nn.supernet import SuperNet

CANDS = ("mb_k3_e3_c8_s1", "mb_k5_e3_c8_s1", "mb_k3_e6_c8_s1", "zero")


def make_op(seed=0):
    torch.manual_seed(seed)
    op = MixedOp(CANDS, in_chs=8).eval()  # eval: BN is deterministic, so re-running a path gives the same output
    with torch.no_grad():
        op.alpha.copy_(torch.randn(len(CANDS)))
    return op


def outputs(op, x):
    with torch.no_grad():
        return [torch.zeros_like(x) if c == "zero" else op.ops[i](x) for i, c in enumerate(CANDS)]


def test_two_path_gradient_matches_binaryconnect_formula():
    op = make_op()
    x, w = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    op.pair = (1, 2)
    op.active = 1
    op.forward_mode = Forward.TWO
    (op(x) * w).sum().backward()
    op.set_alpha_grad_from_gates(GateMode.TWO)
    o = outputs(op, x)
    g = torch.stack([(o[j] * w).sum() for j in range(len(CANDS))])  # dL/dg_j = <o_j, dL/dout>
    a = op.alpha.detach()
    p = torch.softmax(a[[1, 2]], 0)
    expected = torch.zeros(len(CANDS))
    for ii, i in enumerate((1, 2)):
        for jj, j in enumerate((1, 2)):
            expected[i] += g[j] * p[jj] * (float(ii == jj) - p[ii])
    torch.testing.assert_close(op.alpha.grad, expected, rtol=1e-4, atol=1e-6)
    assert op.alpha.grad[0] == 0 and op.alpha.grad[3] == 0  # unsampled paths get nothing


def test_full_v2_gate_gradients_without_stored_activations():
    op = make_op(1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(2, 8, 6, 6)
    op.active = 2
    op.forward_mode = Forward.FULL_V2
    (op(x) * w).sum().backward()
    o = outputs(op, x.detach())
    expected_g = torch.stack([(o[j] * w).sum() for j in range(len(CANDS))])
    torch.testing.assert_close(op.gates.grad, expected_g, rtol=1e-4, atol=1e-5)
    # the input gradient is that of the active path alone
    x2 = x.detach().clone().requires_grad_(True)
    (op.ops[2](x2) * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    op.set_alpha_grad_from_gates(GateMode.FULL_V2)
    torch.testing.assert_close(op.alpha.grad, binary_connect_grad(expected_g, torch.softmax(op.alpha.detach(), 0)),
                               rtol=1e-4, atol=1e-6)


def test_rescale_keeps_unsampled_probabilities():
    op = make_op(2)
    gen = torch.Generator().manual_seed(3)
    a, b = op.sample_two(gen)
    before = torch.softmax(op.alpha.detach(), 0).clone()
    with torch.no_grad():  # any update of the pair, e.g. an Adam step
        op.alpha[a] += 0.7
        op.alpha[b] -= 0.2
    op.rescale_pair()
    after = torch.softmax(op.alpha.detach(), 0)
    others = [i for i in range(len(CANDS)) if i not in (a, b)]
    torch.testing.assert_close(after[others], before[others])
    assert after[a] > before[a]  # the update itself survives
    torch.testing.assert_close(after[[a, b]].sum(), before[[a, b]].sum())


def test_reinforce_gradient_is_unbiased():
    torch.manual_seed(0)
    alpha = torch.randn(4)
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1])
    p = torch.softmax(alpha, 0)
    true_grad = -binary_connect_grad(rewards, p)  # d(-E[R])/dalpha = -sum_j R_j p_j (delta_ij - p_i)
    gen = torch.Generator().manual_seed(1)
    n, baseline = 40_000, 0.4
    samples = torch.multinomial(p, n, replacement=True, generator=gen)
    est = torch.stack([reinforce_grad(alpha, int(s), float(rewards[s]) - baseline) for s in samples[:4000]])
    counts = torch.bincount(samples, minlength=4).float()
    # full-sample mean via counts (same estimator, all 40k draws)
    full = sum(counts[i] * reinforce_grad(alpha, i, float(rewards[i]) - baseline) for i in range(4)) / n
    torch.testing.assert_close(full, true_grad, atol=0.01, rtol=0)
    se = est.std(0) / len(est) ** 0.5
    assert torch.all((est.mean(0) - true_grad).abs() < 4 * se + 1e-3)


def test_weight_step_touches_only_active_path():
    torch.manual_seed(0)
    net = SuperNet(SearchSpace(widths=(8, 16), depths=(2, 2), strides=(1, 2), feature_mix_chs=32))
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    choices = net.sample_single(torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in net.named_weight_parameters()}
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    for name, p in net.named_weight_parameters():
        changed = not torch.equal(before[name], p.detach())
        if ".mixed.ops." in name:
            layer, op = int(name.split(".")[1]), int(name.split(".")[4])
            assert changed == (op == choices[layer]), name
        elif name.endswith("weight") and "blocks" not in name:
            assert changed, name
    assert all(a.grad is None for a in net.arch_parameters())


def test_zero_active_skips_layer_and_gives_no_gradient():
    net = SuperNet(SearchSpace(widths=(8, 8), depths=(2, 1), strides=(1, 1), feature_mix_chs=0))
    block = [b for b in net.blocks if b.mixed.zero_index >= 0][0]
    block.mixed.active = block.mixed.zero_index
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    assert torch.equal(block(x), x)
    block.mixed.forward_mode = Forward.TWO
    block.mixed.pair = (block.mixed.zero_index, 0)
    with torch.no_grad():
        block.mixed.alpha.grad = torch.ones_like(block.mixed.alpha)  # e.g. from the latency term
    (block(x) * 2).sum().backward()
    assert block.mixed.gates is None  # the mixed op never ran
    block.mixed.set_alpha_grad_from_gates(GateMode.TWO)
    assert block.mixed.alpha.grad is None  # the paper's code: no architecture update for this layer this step


def test_zero_op_rejected_on_width_change():
    import pytest

    with pytest.raises(ValueError, match="zero op requested"):
        MixedOp(("mb_k3_e3_c16_s1", "zero"), in_chs=8)


def test_nested_candidates_are_the_standalone_ops_with_sliced_weights():
    from proxyless_ray.nn.ops import build_op

    torch.manual_seed(0)
    cands = ("mb_k3_e3_c8_s1", "mb_k7_e6_c8_s1", "mb_k5_e3_c8_s1", "zero")
    op = MixedOp(cands, in_chs=8, sharing="nested").train()
    names = [n for n, _ in op.named_parameters()]
    assert names[0] == "alpha" and all(n.startswith("elastic.") for n in names[1:])  # the weights live once
    x = torch.randn(4, 8, 6, 6)
    for i, c in enumerate(cands[:3]):
        alone = build_op(c, 8).train()
        alone.load_state_dict(op.ops[i].state_dict())  # strict: the candidate's weights under MBConv's keys
        torch.testing.assert_close(alone(x), op.ops[i](x))


def test_nested_small_kernel_step_trains_only_the_centre_and_the_first_channels():
    torch.manual_seed(0)
    op = MixedOp(("mb_k3_e3_c8_s1", "mb_k7_e6_c8_s1"), in_chs=8, sharing="nested")
    for x in (torch.randn(2, 8, 6, 6), torch.randn(2, 8, 2, 2)):  # oneDNN path, and the small-map weight gradient
        op.zero_grad(set_to_none=True)
        op.active = 0
        (op(x) * torch.randn(2, 8, *x.shape[-2:])).sum().backward()
        dw = op.elastic.depthwise_conv.weight.grad  # [48, 1, 7, 7]
        ring = dw.clone()
        ring[:, :, 2:5, 2:5] = 0
        assert ring.abs().sum() == 0 and dw[:24, :, 2:5, 2:5].abs().sum() > 0
        assert dw[24:].abs().sum() == 0  # expansion 3 uses the first 24 of 48 channels
        assert op.elastic.project_conv.weight.grad[:, 24:].abs().sum() == 0


def test_nested_rejects_candidates_of_different_widths():
    import pytest

    with pytest.raises(ValueError, match="one width and stride"):
        MixedOp(("mb_k3_e3_c8_s1", "mb_k3_e3_c16_s1"), in_chs=8, sharing="nested")


def test_zero_gradient_lets_the_loss_argue_for_a_layer_that_zero_removes():
    net = SuperNet(SearchSpace(widths=(8, 8), depths=(2, 1), strides=(1, 1), feature_mix_chs=0))
    block = [b for b in net.blocks if b.mixed.zero_index >= 0][0]
    m = block.mixed
    m.zero_gradient = True
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    w = torch.randn(2, 8, 14, 14)
    for mode, gate in ((Forward.TWO, GateMode.TWO), (Forward.FULL_V2, GateMode.FULL_V2)):
        m.alpha.grad = None
        m.forward_mode = mode
        m.active, m.pair = m.zero_index, (m.zero_index, 0)
        out = block(x)
        torch.testing.assert_close(out, x)  # the forward is still the skipped layer's
        (out * w).sum().backward()
        with torch.no_grad():
            g_other = (m.ops[0](x) * w).sum()  # dL/dg of the other sampled candidate: <o, dL/dout>
        torch.testing.assert_close(m.gates.grad[0], g_other, rtol=1e-4, atol=1e-4)
        m.set_alpha_grad_from_gates(gate)
        assert m.alpha.grad is not None and m.alpha.grad[0] != 0 and m.alpha.grad[m.zero_index] != 0
    m.forward_mode = Forward.SINGLE  # weight steps and evaluation still skip the layer
    assert m.skips_layer


NESTED = ("mb_k3_e3_c16_s2", "mb_k5_e3_c16_s2", "mb_k7_e3_c16_s2", "mb_k3_e6_c16_s2", "mb_k5_e6_c16_s2",
          "mb_k7_e6_c16_s2", "mb_k5_e1_c16_s2")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("active", [0, 4, 6])
def test_full_v2_shared_candidate_runs_equal_running_each_candidate_alone(channels_last, active):
    # training-mode BN: every re-run candidate normalises with its own batch statistics and moves the shared running
    # statistics, in candidate order; the shared expansion and depthwise convs must give the same numbers
    torch.manual_seed(0)
    op = MixedOp(NESTED, in_chs=8, sharing=WeightSharing.NESTED).train()
    x, w = torch.randn(4, 8, 10, 10), torch.randn(4, 16, 5, 5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    op, x, w = op.to(memory_format=fmt), x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    ref = copy.deepcopy(op)
    op.active, op.forward_mode = active, Forward.FULL_V2
    (op(x) * w).sum().backward()
    order = [active] + [k for k in range(len(NESTED)) if k != active]  # forward first, then the re-runs in order
    expected = torch.zeros(len(NESTED))
    with torch.no_grad():  # the reference: each candidate run by itself, as the paper's code does
        for k in order:
            expected[k] = (ref.ops[k](x) * w).sum()
    torch.testing.assert_close(op.gates.grad, expected, rtol=1e-5, atol=1e-4)
    for (name, got), (_, want) in zip(op.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert op.elastic.project_bn.num_batches_tracked.item() == len(NESTED)  # the reference's count, active included
