"""Torch layers named by block strings: MBConv, conv-BN-ReLU6, zero, classifier.

These are the only layer implementations: the supernet's candidates and the standalone derived network are both
built here from block strings, so a derived network inherits supernet weights by module path.
Layer recipes follow ProxylessNAS (https://arxiv.org/abs/1812.00332): ReLU6, BN eps 1e-3, expansion conv skipped
when the expansion ratio is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from proxyless_ray.arch import BlockSpec, parse_block
from proxyless_ray.depthwise import DepthwiseConv2d

BN_EPS = 1e-3
BN_MOMENTUM = 0.1


def conv_bn(
    in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (same padding, no bias) -> BN -> optional ReLU6."""
    depthwise = groups > 1 and groups == in_chs == out_chs
    layers: list[nn.Module] = [
        DepthwiseConv2d(in_chs, kernel_size, stride) if depthwise
        else nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class ConvBNAct(nn.Module):
    """``conv_k<K>_c<C>_s<S>``: the stem and the 1x1 feature-mix layer."""

    def __init__(self, block: BlockSpec, in_chs: int):
        super().__init__()
        self.conv = conv_bn(in_chs, block.out_chs, block.kernel_size, block.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MBConv(nn.Module):
    """``mb_k<K>_e<E>_c<C>_s<S>``: inverted bottleneck (1x1 expand, KxK depthwise, 1x1 linear project).

    The residual shortcut is not part of this op: the block that holds it adds it (as in the paper's
    ``MobileInvertedResidualBlock``), so a zero op plus the shortcut removes the layer.
    """

    def __init__(self, block: BlockSpec, in_chs: int):
        super().__init__()
        mid = in_chs * block.exp_ratio
        self.expand = conv_bn(in_chs, mid, 1) if block.exp_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, block.kernel_size, block.stride, groups=mid)
        self.project = conv_bn(mid, block.out_chs, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.depthwise(self.expand(x)))


class Zero(nn.Module):
    """The zero op: outputs zeros. Blocks never call it; they skip the layer (the paper's semantics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


class Classifier(nn.Module):
    """Global average pool -> dropout -> linear (``fc_c<N>``)."""

    def __init__(self, in_chs: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


class ResidualBlock(nn.Module):
    """An MBConv with the identity shortcut where stride is 1 and channels match."""

    def __init__(self, block: str | BlockSpec, in_chs: int):
        super().__init__()
        spec = parse_block(block) if isinstance(block, str) else block
        self.op = build_op(spec, in_chs)
        self.shortcut = spec.stride == 1 and spec.out_chs == in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.op(x)
        return out + x if self.shortcut else out


def build_op(block: str | BlockSpec, in_chs: int) -> nn.Module:
    """The layer for a block string; raises ValueError on an unknown block."""
    spec = parse_block(block) if isinstance(block, str) else block
    if spec.kind == "mb":
        return MBConv(spec, in_chs)
    if spec.kind == "conv":
        return ConvBNAct(spec, in_chs)
    return Zero()


def init_weights(model: nn.Module) -> None:
    """He init for convs, unit BN, small uniform for the classifier (as the ProxylessNAS code does)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.weight.size(1) ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
