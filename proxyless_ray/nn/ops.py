"""Torch layers named by block strings: MBConv, conv-BN-ReLU6, zero, classifier.

These are the only layer implementations: the supernet's candidates and the standalone derived network are both
built here from block strings, so a derived network inherits supernet weights by module path.
Layer recipes follow ProxylessNAS (https://arxiv.org/abs/1812.00332): ReLU6, BN eps 1e-3, expansion conv skipped
when the expansion ratio is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from proxyless_ray.nn.arch import BlockSpec, parse_block
from proxyless_ray.nn.depthwise import DepthwiseConv2d, small_map_depthwise

BN_EPS = 1e-3
BN_MOMENTUM = 0.1


def training_layout(x: torch.Tensor) -> torch.Tensor:
    """The layout a CPU training step computes in: channels-last, whatever the batch's layout.

    oneDNN's depthwise convolutions run longer on NCHW tensors on CPU (their backward above all; figures in
    ``docs/benchmarks.md``), which made ``train.channels_last: false`` steps slower; converting the batch once here
    costs one copy of the
    input. Parameters, state dicts and inference (no autograd: evaluation, latency measurement, exported networks)
    keep their own layout; GPUs keep NCHW.
    """
    if (x.device.type == "cpu" and x.dim() == 4 and torch.is_grad_enabled()
            and not x.is_contiguous(memory_format=torch.channels_last)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


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


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels of its input, ``C`` taken from the input: one set of statistics and
    affine parameters shared by every expansion ratio of an :class:`ElasticMBConv` (Once-for-All's elastic width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        training = self.training or self.running_mean is None
        # slices of the 1-D buffers are views, so the running-statistics update lands in the shared buffers
        return nn.functional.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c],
                                        self.bias[:c], training, self.momentum, self.eps)


def _bn_batch(x: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm of ``x``'s ``C`` channels with the batch's statistics and ``bn``'s first ``C`` affine parameters,
    the running statistics untouched; returns the output, the batch mean and the unbiased batch variance."""
    c = x.shape[1]
    out, mean, invstd = torch.native_batch_norm(x, bn.weight[:c], bn.bias[:c], None, None, True, 0.0, bn.eps)
    n = x.numel() // c
    return out, mean, (invstd.pow(-2) - bn.eps) * (n / max(n - 1, 1))


def _update_running(bn: nn.BatchNorm2d, c: int, mean: torch.Tensor, var: torch.Tensor) -> None:
    """What a training-mode forward of ``bn`` over the first ``c`` channels does to its buffers
    (:class:`ElasticBatchNorm2d` counts batches only when it runs on all its channels)."""
    if bn.running_mean is None:
        return
    m = bn.momentum
    bn.running_mean[:c].mul_(1 - m).add_(mean[:c], alpha=m)
    bn.running_var[:c].mul_(1 - m).add_(var[:c], alpha=m)
    if c == bn.num_features and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)


class ElasticMBConv(nn.Module):
    """Every MBConv candidate of one mixed layer in one set of weights (Single-Path NAS's superkernel,
    https://arxiv.org/abs/1904.02877; Once-for-All's elastic kernel and width, https://arxiv.org/abs/1908.09791).

    A ``k x k`` kernel is the centre of the largest kernel and expansion ``e`` uses the first ``in_chs * e``
    channels of the largest expansion, so a weight step on any candidate also trains the weights the others
    share: sampled sub-networks become good in as many steps as one network, where separate weights per candidate
    need thousands of steps before sampled paths mean anything. A step still runs one candidate.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, kernel_sizes: tuple[int, ...],
                 exp_ratios: tuple[int, ...]):
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.max_kernel, self.max_exp = max(kernel_sizes), max(exp_ratios)
        mid = in_chs * self.max_exp
        self.expand_conv = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.expand_bn = ElasticBatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.depthwise_conv = nn.Conv2d(mid, mid, self.max_kernel, stride, self.max_kernel // 2, groups=mid,
                                        bias=False)
        self.depthwise_bn = ElasticBatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.project_conv = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_chs, eps=BN_EPS, momentum=BN_MOMENTUM)

    def depthwise_weight(self, kernel_size: int, mid: int) -> torch.Tensor:
        lo = (self.max_kernel - kernel_size) // 2
        return self.depthwise_conv.weight[:mid, :, lo:lo + kernel_size, lo:lo + kernel_size]

    def forward(self, x: torch.Tensor, kernel_size: int, exp_ratio: int) -> torch.Tensor:
        mid = self.in_chs * exp_ratio
        if exp_ratio != 1:
            x = nn.functional.relu6(self.expand_bn(nn.functional.conv2d(x, self.expand_conv.weight[:mid])))
        w = self.depthwise_weight(kernel_size, mid)
        pad = kernel_size // 2
        if x.device.type == "cpu" and torch.is_grad_enabled() and w.requires_grad and \
                x.shape[-2] * x.shape[-1] <= kernel_size * kernel_size:
            x = small_map_depthwise(x, w, self.stride, pad)
        else:
            x = nn.functional.conv2d(x, w, None, self.stride, pad, 1, mid)
        x = nn.functional.relu6(self.depthwise_bn(x))
        return self.project_bn(nn.functional.conv2d(x, self.project_conv.weight[:, :mid]))

    @torch.no_grad()
    def candidate_outputs(self, x: torch.Tensor, candidates: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The outputs of several candidates ``(kernel_size, exp_ratio)`` on ``x``, without a graph, sharing the work
        they have in common: one expansion at the largest ratio (a smaller ratio's channels are its first ones) and
        one depthwise conv per kernel size over those channels; the projections stay one per candidate.

        The same numbers as calling the candidates one by one in this order, up to rounding, BatchNorm's
        running statistics included: per-channel batch statistics do not depend on which other channels run
        alongside, and each candidate's update is applied in turn.
        """
        if not (self.expand_bn.training and self.depthwise_bn.training and self.project_bn.training):
            return [self(x, k, e) for k, e in candidates]  # frozen BN (running statistics): nothing to share
        expanded: torch.Tensor | None = None
        top = max((e for _, e in candidates if e != 1), default=1)
        expand_stats = None
        if top != 1:
            expanded, *expand_stats = _bn_batch(nn.functional.conv2d(x, self.expand_conv.weight[:self.in_chs * top]),
                                                self.expand_bn)
            expanded = nn.functional.relu6(expanded)
        mids: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        outs = []
        for k, e in candidates:
            mid = self.in_chs * e
            if e != 1:
                _update_running(self.expand_bn, mid, *expand_stats)
            key = (k, e == 1)
            if key not in mids:  # depthwise once per kernel size (and once more for ratio 1, whose input is x)
                src = x if e == 1 else expanded
                c = src.shape[1]
                dw = nn.functional.conv2d(src, self.depthwise_weight(k, c), None, self.stride, k // 2, 1, c)
                dw, mean, var = _bn_batch(dw, self.depthwise_bn)
                mids[key] = (nn.functional.relu6(dw), mean, var)
            h, mean, var = mids[key]
            _update_running(self.depthwise_bn, mid, mean, var)
            out, mean, var = _bn_batch(nn.functional.conv2d(h[:, :mid], self.project_conv.weight[:, :mid]),
                                       self.project_bn)
            _update_running(self.project_bn, self.out_chs, mean, var)
            outs.append(out)
        return outs

    def candidate_state_dict(self, kernel_size: int, exp_ratio: int) -> dict[str, torch.Tensor]:
        """The weights of one candidate under :class:`MBConv`'s state-dict keys (a standalone copy)."""
        mid = self.in_chs * exp_ratio
        out: dict[str, torch.Tensor] = {}

        def bn(prefix: str, m: nn.BatchNorm2d, c: int) -> None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}.{name}"] = getattr(m, name)[:c]
            out[f"{prefix}.num_batches_tracked"] = m.num_batches_tracked

        if exp_ratio != 1:
            out["expand.0.weight"] = self.expand_conv.weight[:mid]
            bn("expand.1", self.expand_bn, mid)
        out["depthwise.0.weight"] = self.depthwise_weight(kernel_size, mid)
        bn("depthwise.1", self.depthwise_bn, mid)
        out["project.0.weight"] = self.project_conv.weight[:, :mid]
        bn("project.1", self.project_bn, self.out_chs)
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


class CandidateView:
    """One candidate of an :class:`ElasticMBConv`, callable like the op it stands for (not a module: its weights
    belong to the elastic op, so they appear once in the supernet's parameters and state dict)."""

    def __init__(self, elastic: ElasticMBConv, kernel_size: int, exp_ratio: int):
        self.elastic, self.kernel_size, self.exp_ratio = elastic, kernel_size, exp_ratio

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.elastic(x, self.kernel_size, self.exp_ratio)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.elastic.candidate_state_dict(self.kernel_size, self.exp_ratio)
