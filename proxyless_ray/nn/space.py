"""Search space: stem, stages of mixed layers over generated MBConv candidates, head (pure Python, no torch).

Candidates are the product kernel sizes x expansion ratios, generated here and never listed by hand. As in the
ProxylessNAS paper (https://arxiv.org/abs/1812.00332, Sec. 4 / ``super_proxyless.py``), the zero op is a candidate
only where a layer has stride 1 and keeps its width: there the identity shortcut remains, so choosing zero removes
the layer and the search covers depth.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from proxyless_ray.nn.arch import ZERO, Arch, BlockSpec, Layer, format_block, out_resolution, parse_block


@dataclass(frozen=True)
class SearchSpace:
    """The over-parameterised network the supernet realises.

    Defaults are the ``small`` preset: 28-32 px images that search in minutes on 2 CPU cores.
    """

    preset: str = "small"
    resolution: int = 28  # input height == width
    in_chs: int = 1  # 1 for grayscale data
    num_classes: int = 10
    stem: str = "conv_k3_c16_s2"  # 28 -> 14 px, as the paper's stem halves 224 -> 112
    first_block: str | None = "mb_k3_e1_c16_s1"  # fixed MBConv1 after the stem (paper); None to omit
    widths: tuple[int, ...] = (16, 24, 40, 48)
    depths: tuple[int, ...] = (2, 3, 3, 2)
    strides: tuple[int, ...] = (1, 2, 2, 1)  # stride of each stage's first block: 14 -> 14 -> 7 -> 4 -> 4 px
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    exp_ratios: tuple[int, ...] = (3, 6)
    zero_op: bool = True  # offer zero wherever it is legal (stride 1, same width)
    feature_mix_chs: int = 160  # 1x1 conv before pooling; 0 to omit
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "strides", "kernel_sizes", "exp_ratios"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.widths) == len(self.depths) == len(self.strides)):
            raise ValueError(
                f"widths {list(self.widths)}, depths {list(self.depths)} and strides {list(self.strides)} must "
                f"have the same length (one entry per stage)"
            )
        for k in self.kernel_sizes:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel size {k} in kernel_sizes is invalid; expected odd sizes like 3, 5, 7")
        for s in self.strides:
            if s not in (1, 2):
                raise ValueError(f"stride {s} in strides is invalid; expected 1 or 2")
        for e in self.exp_ratios:
            if e < 1:
                raise ValueError(f"expansion ratio {e} in exp_ratios is invalid; expected >= 1")
        for d in self.depths:
            if d < 1:
                raise ValueError(f"depth {d} in depths is invalid; expected >= 1")
        if not self.kernel_sizes or not self.exp_ratios:
            raise ValueError("kernel_sizes and exp_ratios must not be empty")
        if parse_block(self.stem).kind != "conv":
            raise ValueError(f"stem {self.stem!r} must be a conv block like 'conv_k3_c32_s2'")
        if self.first_block is not None and parse_block(self.first_block).kind != "mb":
            raise ValueError(f"first_block {self.first_block!r} must be an MBConv block like 'mb_k3_e1_c16_s1'")
        if self.feature_mix_chs < 0:
            raise ValueError(f"feature_mix_chs must be >= 0, got {self.feature_mix_chs}")
        self.slots()  # resolution checks happen while placing the layers

    # -- layout ------------------------------------------------------------------------------------------------

    @property
    def feature_mix(self) -> str | None:
        return format_block(BlockSpec("conv", 1, 0, self.feature_mix_chs, 1)) if self.feature_mix_chs else None

    def slots(self) -> list[Slot]:
        """The mixed layers in order, each with its input shape and generated candidates."""
        out: list[Slot] = []
        res = out_resolution(self.resolution, parse_block(self.stem).stride)
        chs = parse_block(self.stem).out_chs
        if self.first_block is not None:
            fb = parse_block(self.first_block)
            res, chs = out_resolution(res, fb.stride), fb.out_chs
        for si, (width, depth, stride) in enumerate(zip(self.widths, self.depths, self.strides)):
            for bi in range(depth):
                s = stride if bi == 0 else 1
                if s == 2 and res < 2:
                    raise ValueError(f"stage {si} downsamples a {res}x{res} map: resolution {self.resolution} is too "
                                     f"small for strides {list(self.strides)}")
                allow_zero = self.zero_op and s == 1 and chs == width
                cands = candidate_blocks(chs, width, s, self.kernel_sizes, self.exp_ratios, allow_zero)
                out.append(Slot(len(out), si, bi, chs, width, s, res, cands))
                res, chs = out_resolution(res, s), width
        return out

    def fixed_layers(self) -> list[Layer]:
        """Layers every architecture in the space shares (stem, fixed first block, feature mix, classifier)."""
        arch = self.arch_from_blocks([s.candidates[0] for s in self.slots()])
        n_stages = len(arch.stages)
        fixed_stages = {-1, n_stages} | ({0} if self.first_block is not None else set())
        return [layer for layer in arch.layers() if layer.stage in fixed_stages]

    def arch_from_blocks(self, blocks: Sequence[str], name: str = "") -> Arch:
        """The architecture that picks ``blocks[i]`` at mixed layer ``i`` (zero ops kept in place)."""
        slots = self.slots()
        if len(blocks) != len(slots):
            raise ValueError(f"expected {len(slots)} blocks (one per mixed layer), got {len(blocks)}")
        for slot, b in zip(slots, blocks):
            if b not in slot.candidates:
                raise ValueError(f"block {b!r} is not a candidate of mixed layer {slot.index}; "
                                 f"expected one of {list(slot.candidates)}")
        stages: list[list[str]] = [[self.first_block]] if self.first_block is not None else []
        for si in range(len(self.widths)):
            stages.append([b for slot, b in zip(slots, blocks) if slot.stage == si])
        return Arch(self.stem, tuple(tuple(s) for s in stages), self.feature_mix, self.num_classes, self.resolution,
                    self.in_chs, self.dropout, name=name, meta={"space": self.fingerprint()})

    def arch_from_choices(self, choices: Sequence[int], name: str = "") -> Arch:
        """Like :meth:`arch_from_blocks` with candidate indices."""
        slots = self.slots()
        if len(choices) != len(slots):
            raise ValueError(f"expected {len(slots)} choices (one per mixed layer), got {len(choices)}")
        return self.arch_from_blocks([s.candidates[int(c)] for s, c in zip(slots, choices)], name=name)

    def choices_of(self, arch: Arch) -> list[int]:
        """Candidate index per mixed layer for an architecture of this space (zero layers kept in place)."""
        first = 1 if self.first_block is not None else 0
        if len(arch.stages) != len(self.widths) + first:
            raise ValueError(f"architecture has {len(arch.stages)} stages; this space has {len(self.widths) + first}")
        blocks = [b for st in arch.stages[first:] for b in st]
        slots = self.slots()
        if len(blocks) != len(slots):
            raise ValueError(f"architecture has {len(blocks)} searchable blocks; this space has {len(slots)}")
        out = []
        for slot, b in zip(slots, blocks):
            if b not in slot.candidates:
                raise ValueError(f"block {b!r} at mixed layer {slot.index} is not a candidate of this space")
            out.append(slot.candidates.index(b))
        return out

    def sample(self, rng: random.Random, name: str = "") -> Arch:
        """An architecture drawn uniformly per mixed layer (the random-search baseline)."""
        return self.arch_from_blocks([rng.choice(s.candidates) for s in self.slots()], name=name)

    # -- identity ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("widths", "depths", "strides", "kernel_sizes", "exp_ratios"):
            d[k] = list(d[k])
        return d

    def fingerprint(self) -> str:
        """Short hash of everything that shapes the supernet (not the preset's name)."""
        d = self.to_dict()
        d.pop("preset")
        d.pop("dropout")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Slot:
    """One mixed layer of the space: position, the shape it sees, and its candidate block strings."""

    index: int
    stage: int  # index into widths/depths/strides
    position: int  # block index within the stage
    in_chs: int
    out_chs: int
    stride: int
    resolution: int  # input height == width
    candidates: tuple[str, ...]

    @property
    def has_zero(self) -> bool:
        return ZERO in self.candidates


def candidate_blocks(in_chs: int, out_chs: int, stride: int, kernel_sizes: Sequence[int], exp_ratios: Sequence[int],
                     zero: bool) -> tuple[str, ...]:
    """Generate the candidate block strings of one mixed layer: kernels x expansions (+ zero, last).

    Raises:
        ValueError: if zero is requested where the paper does not allow it (stride 2 or a width change).
    """
    if zero and (stride != 1 or in_chs != out_chs):
        raise ValueError(f"zero op requested on a layer with stride {stride} and {in_chs}->{out_chs} channels; "
                         f"zero is only allowed where stride is 1 and in_chs == out_chs")
    cands = [format_block(BlockSpec("mb", k, e, out_chs, stride)) for k in kernel_sizes for e in exp_ratios]
    return tuple(cands + [ZERO]) if zero else tuple(cands)


PRESETS: dict[str, dict[str, Any]] = {
    # Paper (super_proxyless.py): stem 32 -> fixed MBConv1 16, six stages, {3,5,7}x{3,6} + zero, mix 1280, 224 px.
    "proxyless_imagenet": dict(
        resolution=224, in_chs=3, num_classes=1000, stem="conv_k3_c32_s2", first_block="mb_k3_e1_c16_s1",
        widths=(24, 40, 80, 96, 192, 320), depths=(4, 4, 4, 4, 4, 1), strides=(2, 2, 2, 1, 2, 1),
        kernel_sizes=(3, 5, 7), exp_ratios=(3, 6), zero_op=True, feature_mix_chs=1280,
    ),
    # 28-32 px data (Fashion-MNIST, CIFAR): the field defaults.
    "small": {},
}


def space_from_preset(name: str, **overrides: Any) -> SearchSpace:
    """A preset's space with field overrides; raises ValueError naming an unknown preset or field."""
    if name not in PRESETS:
        raise ValueError(f"unknown search-space preset {name!r}; expected one of {sorted(PRESETS)}")
    valid = {f.name for f in fields(SearchSpace)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown search-space field(s) {bad}; expected some of {sorted(valid)}")
    return replace(SearchSpace(preset=name, **PRESETS[name]), **overrides)
