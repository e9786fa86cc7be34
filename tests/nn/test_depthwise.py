"""The depthwise conv's batched-matmul weight gradient against PyTorch's own convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from proxyless_ray.nn.depthwise import DepthwiseConv2d, depthwise_weight_grad, tap_index
from proxyless_ray.nn.ops import build_op


def reference_grads(x, weight, grad_out, stride, padding):
    x = x.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    F.conv2d(x, w, None, stride, padding, 1, w.shape[0]).backward(grad_out)
    return x.grad, w.grad


@pytest.mark.parametrize("size,kernel_size,stride", [(4, 7, 1), (4, 5, 1), (4, 3, 1), (7, 7, 2), (7, 7, 1),
                                                     (8, 7, 2), (5, 5, 2), (3, 5, 1), (6, 3, 2)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_weight_gradient_equals_the_convolution_s(size, kernel_size, stride, channels_last):
    torch.manual_seed(size * 100 + kernel_size * 10 + stride)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(5, 6, size, size).contiguous(memory_format=fmt)
    w = torch.randn(6, 1, kernel_size, kernel_size)
    out = F.conv2d(x, w, None, stride, kernel_size // 2, 1, 6)
    g = torch.randn_like(out)
    _, ref = reference_grads(x, w, g, stride, kernel_size // 2)
    torch.testing.assert_close(depthwise_weight_grad(x, g, kernel_size, stride, kernel_size // 2), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel_size,stride", [(4, 7, 1), (7, 7, 2), (4, 5, 1)])
def test_module_takes_the_fast_path_on_small_maps_with_the_same_output_and_gradients(size, kernel_size, stride,
                                                                                      monkeypatch):
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, kernel_size, stride)
    x = torch.randn(3, 8, size, size, requires_grad=True)
    calls = []
    import proxyless_ray.nn.depthwise as depthwise

    real = depthwise.depthwise_weight_grad
    monkeypatch.setattr(depthwise, "depthwise_weight_grad", lambda *a: calls.append(a) or real(*a))
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert len(calls) == 1
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, None, stride, kernel_size // 2, 1, 8))
    ref_x, ref_w = reference_grads(x, conv.weight, g, stride, kernel_size // 2)
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(conv.weight.grad, ref_w, rtol=1e-5, atol=1e-5)


def test_large_maps_no_grad_and_frozen_weights_use_plain_conv2d(monkeypatch):
    import proxyless_ray.nn.depthwise as depthwise

    monkeypatch.setattr(depthwise._SmallMapDepthwise, "apply", lambda *a: pytest.fail("fast path taken"))
    conv = DepthwiseConv2d(4, 3)
    conv(torch.randn(2, 4, 8, 8, requires_grad=True)).sum().backward()  # 64 pixels > 9 taps
    small = DepthwiseConv2d(4, 7)
    with torch.no_grad():
        small(torch.randn(2, 4, 4, 4))
    small.weight.requires_grad_(False)
    small(torch.randn(2, 4, 4, 4, requires_grad=True)).sum().backward()


def test_tap_index_joins_each_pair_at_one_tap_or_none():
    idx = tap_index(4, 4, 3, 1, 1).reshape(16, 16)  # output pixel x input pixel
    assert idx[0, 0] == 4  # output (0,0) meets input (0,0) at the kernel's centre
    assert idx[0, 1] == 5 and idx[0, 4] == 7  # right neighbour, neighbour below
    assert idx[0, 15] == 9  # too far: no tap (the dropped slot)
    assert int((idx < 9).sum()) == 10 * 10  # per axis, the 4 outputs see 2 + 3 + 3 + 2 inputs


def test_mbconv_state_dict_is_unchanged_by_the_depthwise_layer():
    op = build_op("mb_k7_e6_c16_s1", 16)
    assert isinstance(op.depthwise[0], DepthwiseConv2d) and isinstance(op.depthwise[0], nn.Conv2d)
    assert "depthwise.0.weight" in op.state_dict() and not any("bias" in k for k in op.state_dict()
                                                                 if k.startswith("depthwise.0"))
    plain = nn.Conv2d(96, 96, 7, 1, 3, groups=96, bias=False)
    plain.load_state_dict({"weight": op.depthwise[0].weight.detach().clone()})
    x = torch.randn(2, 96, 4, 4)
    torch.testing.assert_close(op.depthwise[0](x), plain(x))
