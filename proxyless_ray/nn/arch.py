"""Architecture encoding: blocks as short strings, networks as versioned JSON (pure Python, no torch).

A block string in the spirit of timm's EfficientNet builder names one layer:

* ``mb_k5_e6_c40_s2`` -- MBConv (inverted residual) with kernel 5, expansion 6, 40 output channels, stride 2;
* ``conv_k3_c32_s2``  -- plain conv + BN + ReLU6 (the stem and the 1x1 feature-mix layer);
* ``zero``            -- the zero op of ProxylessNAS: with the identity shortcut the layer is skipped.

A network is a stem, a list of stages of block strings, a feature-mix layer and a classifier, saved as JSON with a
``version`` field. Latency-table keys use the same formatter plus the input shape (``layer_key``), so the search
space, the latency model and the exported network cannot drift apart.

ProxylessNAS: Cai, Zhu, Han, "ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware",
ICLR 2019, https://arxiv.org/abs/1812.00332
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from proxyless_ray.fileio import atomic_write_text

ARCH_VERSION = 1
ZERO = "zero"

_MB_RE = re.compile(r"^mb_k(\d+)_e(\d+)_c(\d+)_s(\d+)$")
_CONV_RE = re.compile(r"^conv_k(\d+)_c(\d+)_s(\d+)$")


@dataclass(frozen=True)
class BlockSpec:
    """One layer of a network.

    Attributes:
        kind: ``"mb"`` (MBConv), ``"conv"`` (conv-BN-ReLU6) or ``"zero"``.
        kernel_size: Odd spatial kernel size (0 for zero).
        exp_ratio: MBConv expansion ratio (1 means no expansion conv; 0 for conv and zero).
        out_chs: Output channels (0 for zero: it keeps its input's channels).
        stride: 1 or 2.
    """

    kind: str
    kernel_size: int = 0
    exp_ratio: int = 0
    out_chs: int = 0
    stride: int = 1

    def __post_init__(self) -> None:
        if self.kind == ZERO:
            if self.stride != 1:
                raise ValueError(f"zero op needs stride 1, got stride {self.stride}")
            return
        if self.kind not in ("mb", "conv"):
            raise ValueError(f"unknown block kind {self.kind!r}; expected 'mb', 'conv' or 'zero'")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")
        if self.out_chs < 1:
            raise ValueError(f"out_chs must be positive, got {self.out_chs}")
        if self.kind == "mb" and self.exp_ratio < 1:
            raise ValueError(f"exp_ratio must be >= 1, got {self.exp_ratio}")

    @property
    def is_zero(self) -> bool:
        return self.kind == ZERO

    def __str__(self) -> str:
        return format_block(self)


def parse_block(text: str) -> BlockSpec:
    """Parse a block string such as ``mb_k5_e6_c40_s2``, ``conv_k3_c32_s2`` or ``zero``.

    Raises:
        ValueError: naming the string and the accepted forms when it does not parse or is invalid.
    """
    if not isinstance(text, str):
        raise ValueError(f"block must be a string, got {type(text).__name__} {text!r}")
    s = text.strip()
    if s == ZERO:
        return BlockSpec(ZERO)
    try:
        if m := _MB_RE.match(s):
            k, e, c, st = (int(g) for g in m.groups())
            return BlockSpec("mb", kernel_size=k, exp_ratio=e, out_chs=c, stride=st)
        if m := _CONV_RE.match(s):
            k, c, st = (int(g) for g in m.groups())
            return BlockSpec("conv", kernel_size=k, out_chs=c, stride=st)
    except ValueError as err:
        raise ValueError(f"invalid block {text!r}: {err}") from None
    raise ValueError(
        f"unknown block string {text!r}; expected 'mb_k<K>_e<E>_c<C>_s<S>', 'conv_k<K>_c<C>_s<S>' or 'zero'"
    )


def format_block(block: BlockSpec) -> str:
    """Inverse of :func:`parse_block`."""
    if block.kind == ZERO:
        return ZERO
    if block.kind == "mb":
        return f"mb_k{block.kernel_size}_e{block.exp_ratio}_c{block.out_chs}_s{block.stride}"
    return f"conv_k{block.kernel_size}_c{block.out_chs}_s{block.stride}"


def layer_key(block: str | BlockSpec, in_chs: int, resolution: int) -> str:
    """Latency-table key: the block string plus its input shape, e.g. ``mb_k5_e6_c40_s2@24x56x56``.

    Residual shortcuts are implied by the block (stride 1 and equal channels) and so need no field of their own.
    The classifier key is ``fc_c<N>@<C>x<H>x<W>`` and covers global pooling plus the linear layer.
    """
    text = block if isinstance(block, str) else format_block(block)
    return f"{text}@{in_chs}x{resolution}x{resolution}"


def parse_layer_key(key: str) -> tuple[str, int, int]:
    """Split a :func:`layer_key` into ``(block string, in_chs, resolution)``."""
    m = re.match(r"^([a-z0-9_]+)@(\d+)x(\d+)x(\d+)$", key)
    if not m or m.group(3) != m.group(4):
        raise ValueError(f"invalid layer key {key!r}; expected '<block>@<C>x<H>x<W>' with H == W")
    block = m.group(1)
    if not block.startswith("fc_c"):
        parse_block(block)
    return block, int(m.group(2)), int(m.group(3))


def out_resolution(resolution: int, stride: int) -> int:
    """Spatial size after a 'same'-padded layer of this stride."""
    return (resolution + stride - 1) // stride


@dataclass(frozen=True)
class Layer:
    """A block placed in a network: its string plus the shape it sees (what a latency model prices)."""

    block: str
    in_chs: int
    out_chs: int
    resolution: int  # input height == width
    stage: int  # -1 for the stem, the fixed first block uses 0, len(stages) for the head

    @property
    def key(self) -> str:
        return layer_key(self.block, self.in_chs, self.resolution)


@dataclass(frozen=True)
class Arch:
    """A whole network: stem, stages of blocks, feature mix, classifier.

    Attributes:
        stem: Block string of the first conv, e.g. ``conv_k3_c32_s2``.
        stages: Tuple of stages, each a tuple of block strings (``zero`` allowed: the layer is skipped).
        feature_mix: 1x1 conv before pooling, e.g. ``conv_k1_c1280_s1``, or ``None``.
        num_classes: Classifier outputs.
        resolution: Input height == width in pixels.
        in_chs: Input channels (1 for grayscale).
        dropout: Dropout before the classifier.
        name: Free-form label.
    """

    stem: str
    stages: tuple[tuple[str, ...], ...]
    feature_mix: str | None
    num_classes: int
    resolution: int
    in_chs: int = 3
    dropout: float = 0.0
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        self.validate()

    # -- structure ---------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every block parses and shapes chain; raise ValueError naming the offending layer."""
        if self.resolution < 1 or self.in_chs < 1 or self.num_classes < 1:
            raise ValueError(
                f"resolution, in_chs and num_classes must be positive, got {self.resolution}, {self.in_chs}, "
                f"{self.num_classes}"
            )
        stem = parse_block(self.stem)
        if stem.kind != "conv":
            raise ValueError(f"stem must be a conv block like 'conv_k3_c32_s2', got {self.stem!r}")
        if self.feature_mix is not None:
            mix = parse_block(self.feature_mix)
            if mix.kind != "conv" or mix.stride != 1:
                raise ValueError(f"feature_mix must be a stride-1 conv block, got {self.feature_mix!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        res = out_resolution(self.resolution, stem.stride)
        for si, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"stage {si} is empty; drop it or give it a block")
            for bi, text in enumerate(stage):
                b = parse_block(text)
                if b.kind == "conv":
                    raise ValueError(f"stage {si} block {bi}: {text!r} is a plain conv; stages hold 'mb' or 'zero'")
                if b.stride == 2 and res < 2:
                    raise ValueError(
                        f"stage {si} block {bi}: {text!r} downsamples a {res}x{res} feature map; "
                        f"input resolution {self.resolution} is too small for this network"
                    )
                res = out_resolution(res, b.stride)

    def layers(self) -> list[Layer]:
        """Every layer with the input shape it sees, in order: stem, blocks (zero included), feature mix, fc."""
        out: list[Layer] = []
        res, chs = self.resolution, self.in_chs
        stem = parse_block(self.stem)
        out.append(Layer(self.stem, chs, stem.out_chs, res, -1))
        res, chs = out_resolution(res, stem.stride), stem.out_chs
        for si, stage in enumerate(self.stages):
            for text in stage:
                b = parse_block(text)
                out_chs = chs if b.is_zero else b.out_chs
                out.append(Layer(text, chs, out_chs, res, si))
                if not b.is_zero:
                    res, chs = out_resolution(res, b.stride), b.out_chs
        if self.feature_mix is not None:
            mix = parse_block(self.feature_mix)
            out.append(Layer(self.feature_mix, chs, mix.out_chs, res, len(self.stages)))
            chs = mix.out_chs
        out.append(Layer(f"fc_c{self.num_classes}", chs, self.num_classes, res, len(self.stages)))
        return out

    def without_zeros(self) -> Arch:
        """The same network with zero layers dropped (what gets exported and retrained)."""
        stages = tuple(tuple(b for b in st if b != ZERO) for st in self.stages)
        return Arch(
            self.stem, tuple(s for s in stages if s), self.feature_mix, self.num_classes, self.resolution,
            self.in_chs, self.dropout, self.name, dict(self.meta),
        )

    def blocks(self) -> list[str]:
        """All block strings of the stages, flattened."""
        return [b for st in self.stages for b in st]

    def arch_string(self) -> str:
        """One-line summary: stages joined by '|', blocks by ','; handy as an MLflow tag."""
        return "|".join(",".join(st) for st in self.stages)

    # -- JSON --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": ARCH_VERSION,
            "name": self.name,
            "input": {"resolution": self.resolution, "in_chs": self.in_chs},
            "num_classes": self.num_classes,
            "stem": self.stem,
            "stages": [list(s) for s in self.stages],
            "feature_mix": self.feature_mix,
            "dropout": self.dropout,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> Arch:
        """Build from :meth:`to_dict` output; raises ValueError on a wrong version or missing fields."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: architecture JSON must be an object, got {type(d).__name__}")
        if "first_conv" in d and "blocks" in d:
            return from_proxyless_config(d, source)
        version = d.get("version")
        if version != ARCH_VERSION:
            raise ValueError(f"{source}: architecture version {version!r} is not supported; expected {ARCH_VERSION}")
        known = {"version", "name", "input", "num_classes", "stem", "stages", "feature_mix", "dropout", "meta"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown architecture field(s) {unknown}; expected {sorted(known)}")
        stages = d.get("stages")
        if not isinstance(stages, list) or not all(isinstance(st, list) and all(isinstance(b, str) for b in st)
                                                   for st in stages):
            raise ValueError(f"{source}: 'stages' must be a list of lists of block strings, got {stages!r}")
        try:
            inp = d["input"]
            return cls(
                stem=d["stem"], stages=tuple(tuple(s) for s in d["stages"]), feature_mix=d.get("feature_mix"),
                num_classes=int(d["num_classes"]), resolution=int(inp["resolution"]), in_chs=int(inp["in_chs"]),
                dropout=float(d.get("dropout", 0.0)), name=str(d.get("name", "")), meta=dict(d.get("meta") or {}),
            )
        except KeyError as err:
            raise ValueError(f"{source}: architecture JSON lacks field {err}") from None
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"{source}: a field has the wrong type ({err}); expected 'stages' as a list of lists of "
                             f"block strings, 'input' as {{resolution, in_chs}} and block strings for 'stem' and "
                             f"'feature_mix'") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Arch:
        """Load our JSON or a published ProxylessNAS network config (a folder: its ``arch.json``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "arch.json")):
                raise FileNotFoundError(f"{path!r} is a folder without arch.json; expected an architecture JSON file "
                                        f"or a network folder holding one")
            path = os.path.join(path, "arch.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"architecture file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not a text file; expected an architecture JSON") from None
        return cls.from_dict(d, source=path)


def from_proxyless_config(d: dict[str, Any], source: str = "<config>", resolution: int = 224) -> Arch:
    """Convert a published ProxylessNAS network config (``first_conv``, ``blocks``, ...) into an :class:`Arch`.

    Blocks are grouped into stages at every width change, with the first block (the fixed MBConv1) alone, which
    reproduces the paper's stage layout. Zero layers are kept so the layer positions match the search space.
    """
    try:
        fc = d["first_conv"]
        stem = format_block(BlockSpec("conv", int(fc["kernel_size"]), 0, int(fc["out_channels"]), int(fc["stride"])))
        in_chs = int(fc["in_channels"])
        stages: list[list[str]] = []
        prev_out = None
        for i, blk in enumerate(d["blocks"]):
            conv = blk["mobile_inverted_conv"]
            if conv["name"] == "ZeroLayer":
                if not stages:
                    raise ValueError(f"block {i}: a ZeroLayer cannot open the network")
                stages[-1].append(ZERO)
                continue
            if conv["name"] != "MBInvertedConvLayer":
                raise ValueError(
                    f"block {i}: unsupported layer {conv['name']!r}; expected MBInvertedConvLayer or ZeroLayer"
                )
            b = BlockSpec("mb", int(conv["kernel_size"]), int(conv["expand_ratio"]), int(conv["out_channels"]),
                          int(conv["stride"]))
            expected_in = int(fc["out_channels"]) if prev_out is None else prev_out
            if int(conv["in_channels"]) != expected_in:
                raise ValueError(
                    f"block {i}: in_channels {conv['in_channels']} does not chain with the previous output "
                    f"{expected_in}"
                )
            if i <= 1 or b.out_chs != prev_out:
                stages.append([])
            stages[-1].append(format_block(b))
            prev_out = b.out_chs
        mix = d.get("feature_mix_layer")
        feature_mix = None
        if mix:
            feature_mix = format_block(BlockSpec("conv", int(mix["kernel_size"]), 0, int(mix["out_channels"]), 1))
        num_classes = int(d["classifier"]["out_features"])
        dropout = float(d["classifier"].get("dropout_rate", 0.0) or 0.0)
    except KeyError as err:
        raise ValueError(f"{source}: ProxylessNAS config lacks field {err}") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    except (TypeError, AttributeError) as err:
        raise ValueError(f"{source}: a field of the ProxylessNAS config has the wrong type ({err}); expected objects "
                         f"for first_conv, each block's mobile_inverted_conv and classifier") from None
    return Arch(stem, tuple(tuple(s) for s in stages), feature_mix, num_classes, resolution, in_chs, dropout,
                name=str(d.get("name", "")), meta={"source": "proxylessnas-config"})
