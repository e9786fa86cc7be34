"""The over-parameterised supernet: fixed stem/head around one :class:`MixedOp` per searchable layer.

Gate sampling takes an explicit ``torch.Generator`` so every data-parallel rank, seeded alike per step, samples
the same sub-network. Deriving takes argmax(alpha) per layer and drops zero layers; the derived network's
weights are copied out of the supernet by module path (:meth:`SuperNet.derived_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from proxyless_ray.nn.arch import Arch, parse_block
from proxyless_ray.nn.mixed_op import Forward, GateMode, MixedOp, WeightSharing
from proxyless_ray.nn.ops import Classifier, ConvBNAct, ResidualBlock, init_weights, training_layout
from proxyless_ray.nn.space import SearchSpace


class MixedBlock(nn.Module):
    """A mixed op with the identity shortcut where the layer keeps its shape (the paper's residual block)."""

    def __init__(self, candidates: tuple[str, ...], in_chs: int, out_chs: int, stride: int,
                 sharing: WeightSharing | str = WeightSharing.SEPARATE):
        super().__init__()
        self.mixed = MixedOp(candidates, in_chs, sharing)
        self.shortcut = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixed
        if m.skips_layer:
            return x  # zero op + identity shortcut: the layer is skipped
        out = m(x)
        return out + x if self.shortcut else out


class SuperNet(nn.Module):
    """Supernet over a :class:`SearchSpace`.

    Args:
        space: The search space.
        alpha_init_std: Std of the normal init of the architecture logits (paper: 1e-3).
        weight_sharing: Separate weights per candidate (the paper) or nested in one elastic op per layer.
    """

    def __init__(self, space: SearchSpace, alpha_init_std: float = 1e-3,
                 weight_sharing: WeightSharing | str = WeightSharing.SEPARATE):
        super().__init__()
        self.space = space
        self.weight_sharing = WeightSharing(weight_sharing)
        stem = parse_block(space.stem)
        self.stem = ConvBNAct(stem, space.in_chs)
        chs = stem.out_chs
        self.first = None
        if space.first_block is not None:
            self.first = ResidualBlock(space.first_block, chs)
            chs = parse_block(space.first_block).out_chs
        self.slots = space.slots()
        self.blocks = nn.ModuleList([MixedBlock(s.candidates, s.in_chs, s.out_chs, s.stride, self.weight_sharing)
                                     for s in self.slots])
        chs = self.slots[-1].out_chs
        self.feature_mix = nn.Identity()
        if space.feature_mix is not None:
            self.feature_mix = ConvBNAct(parse_block(space.feature_mix), chs)
            chs = space.feature_mix_chs
        self.classifier = Classifier(chs, space.num_classes, space.dropout)
        init_weights(self)
        with torch.no_grad():
            for m in self.mixed_ops():
                m.alpha.normal_(0.0, alpha_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = training_layout(self.stem(training_layout(x)))  # after the stem too: a 1-channel batch is both layouts
        if self.first is not None:
            x = self.first(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.feature_mix(x))

    # -- parameters --------------------------------------------------------------------------------------------

    def mixed_ops(self) -> list[MixedOp]:
        return [b.mixed for b in self.blocks]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [m.alpha for m in self.mixed_ops()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not name.endswith(".alpha"):
                yield name, p

    @contextmanager
    def weights_frozen(self) -> Iterator[None]:
        """Arch steps need no weight gradients: turning them off skips the weight-gradient kernels."""
        params = self.weight_parameters()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    # -- gates -------------------------------------------------------------------------------------------------

    def set_forward(self, mode: Forward) -> None:
        for m in self.mixed_ops():
            m.forward_mode = mode

    def sample_single(self, generator: torch.Generator) -> list[int]:
        """Weight step: one active path per layer, everything else out of the graph."""
        self.set_forward(Forward.SINGLE)
        return [m.sample_single(generator) for m in self.mixed_ops()]

    def sample_for_arch(self, mode: GateMode, generator: torch.Generator) -> list[int]:
        """Arch step: sample gates as ``mode`` needs them and set the matching forward."""
        if mode == GateMode.TWO:
            self.set_forward(Forward.TWO)
            return [m.sample_two(generator)[0] for m in self.mixed_ops()]
        active = [m.sample_single(generator) for m in self.mixed_ops()]
        self.set_forward(Forward.FULL_V2 if mode == GateMode.FULL_V2 else Forward.SINGLE)
        return active

    def set_active(self, choices: list[int]) -> None:
        """Fix the active path of every layer (single-path forward)."""
        self.set_forward(Forward.SINGLE)
        for m, c in zip(self.mixed_ops(), choices):
            m.active = int(c)

    def set_argmax(self) -> list[int]:
        self.set_forward(Forward.SINGLE)
        return [m.set_argmax() for m in self.mixed_ops()]

    def set_alpha_grads(self, mode: GateMode) -> None:
        for m in self.mixed_ops():
            m.set_alpha_grad_from_gates(mode)

    def rescale_pairs(self) -> None:
        for m in self.mixed_ops():
            m.rescale_pair()

    # -- derive ------------------------------------------------------------------------------------------------

    def probs(self) -> list[torch.Tensor]:
        return [m.probs().detach() for m in self.mixed_ops()]

    def argmax_choices(self) -> list[int]:
        return [int(torch.argmax(m.alpha.detach())) for m in self.mixed_ops()]

    def entropy(self) -> float:
        """Mean entropy (nats) of the per-layer op distributions: how undecided the search still is."""
        ents = [-(p * torch.log(p.clamp_min(1e-12))).sum() for p in self.probs()]
        return float(torch.stack(ents).mean())

    def derive(self, choices: list[int] | None = None, name: str = "") -> Arch:
        """The argmax (or given) architecture, zero layers kept in place; ``.without_zeros()`` to export."""
        return self.space.arch_from_choices(self.argmax_choices() if choices is None else choices, name=name)

    def derived_state_dict(self, choices: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Weights of the chosen sub-network under :class:`~proxyless_ray.nn.network.ProxylessNet`'s module names."""
        choices = self.argmax_choices() if choices is None else choices
        out: dict[str, torch.Tensor] = {}

        def copy(module: nn.Module, prefix: str) -> None:
            for k, v in module.state_dict().items():
                out[f"{prefix}.{k}"] = v.detach().clone()

        copy(self.stem, "stem")
        i = 0
        if self.first is not None:
            copy(self.first, f"blocks.{i}")
            i += 1
        for block, c in zip(self.blocks, choices):
            m = block.mixed
            if c == m.zero_index:
                continue
            copy(m.ops[c], f"blocks.{i}.op")
            i += 1
        if isinstance(self.feature_mix, ConvBNAct):
            copy(self.feature_mix, "feature_mix")
        copy(self.classifier, "classifier")
        return out
