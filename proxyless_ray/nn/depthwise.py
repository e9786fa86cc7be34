"""Depthwise convolution with a fast weight gradient on CPU where the kernel covers most of the feature map.

oneDNN's depthwise weight gradient on CPU (AVX2) is slow when the map is small against the kernel: for a 7x7
depthwise conv on a 4x4 map (the last stages of a 32-pixel input, or 7x7 kernels on ImageNet's 7x7 stage) the
backward takes many times the forward and a large share of a supernet weight step (figures: ``docs/benchmarks.md``,
depthwise weight gradient). There the gradient
is a small batched matrix product instead: with ``L`` output and ``P`` input pixels per channel, every
(output pixel, input pixel) pair meets at one kernel tap, so

    dT[c] = g[c] (L x N) @ x[c] (N x P),    dW[c, tap] = sum of dT[c] over the pairs that meet at that tap,

``C * L * P * N`` multiply-adds, fewer than the direct ``C * L * K^2 * N`` when ``P <= K^2``. The forward and the
input gradient stay oneDNN's (fast at these sizes), so inference, latency profiling and exported networks see the
same op as before; only the weight gradient's summation order changes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F


@functools.lru_cache(maxsize=256)
def tap_index(height: int, width: int, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """For every (output pixel, input pixel) pair, the kernel tap that joins them (``kernel_size**2``: none).

    Returns:
        A flat ``int64`` index of length ``out_pixels * height * width``, row-major over (output, input) pixels.
    """
    out_h = (height + 2 * padding - kernel_size) // stride + 1
    out_w = (width + 2 * padding - kernel_size) // stride + 1
    oi, oj = torch.meshgrid(torch.arange(out_h), torch.arange(out_w), indexing="ij")
    ii, ij = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    a = ii.reshape(1, -1) - oi.reshape(-1, 1) * stride + padding  # [out pixels, in pixels]: the kernel row
    b = ij.reshape(1, -1) - oj.reshape(-1, 1) * stride + padding
    inside = (a >= 0) & (a < kernel_size) & (b >= 0) & (b < kernel_size)
    return torch.where(inside, a * kernel_size + b, kernel_size * kernel_size).reshape(-1)


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int, stride: int,
                          padding: int) -> torch.Tensor:
    """The depthwise kernel's gradient, ``[C, 1, K, K]``, as one batched matrix product (see the module doc)."""
    n, c, h, w = x.shape
    # from NCHW every channel's matrix is contiguous or transposed, which bmm hands to one strided batched GEMM; from
    # channels-last (the search's layout on CPU) it copies each channel's matrices first, a fixed cost per channel
    # whatever the batch (docs/benchmarks.md)
    xs = x.contiguous().permute(1, 0, 2, 3).reshape(c, n, h * w)  # [C, N, P]
    gs = grad_out.contiguous().permute(1, 2, 3, 0).reshape(c, -1, n)  # [C, L, N]
    pairs = torch.bmm(gs, xs).reshape(c, -1)  # [C, L * P]
    taps = pairs.new_zeros(c, kernel_size * kernel_size + 1)
    taps.index_add_(1, tap_index(h, w, kernel_size, stride, padding), pairs)
    return taps[:, :-1].reshape(c, 1, kernel_size, kernel_size)


class _SmallMapDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [s, s], [p, p], [1, 1], False,
                                                         [0, 0], weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, weight.shape[-1], s, p)
        return grad_x, grad_w, None, None


def small_map_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """A depthwise conv whose weight gradient is :func:`depthwise_weight_grad` (callers check the map size)."""
    return _SmallMapDepthwise.apply(x, weight, stride, padding)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (square kernel, same padding, no bias): the same parameters and state-dict keys.

    On CPU, with autograd on, and where the input map has no more pixels than the kernel has taps, the weight
    gradient comes from :func:`depthwise_weight_grad`; everywhere else it is ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1):
        super().__init__(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and x.shape[-2] * x.shape[-1] <= k * k):
            return small_map_depthwise(x, self.weight, self.stride[0], self.padding[0])
        return super().forward(x)
