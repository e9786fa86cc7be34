"""How a block looks in every picture (kernel colour, expansion width/linestyle), atomic PNG saving, and the
architecture picture.

The picture follows Figure 4 of ProxylessNAS (Cai, Zhu, Han, ICLR 2019, https://arxiv.org/abs/1812.00332): one box
per block from the stem to the head, colour = kernel size, box width = expansion ratio. Figures are built as bare
:class:`matplotlib.figure.Figure` objects on an Agg canvas, never through ``pyplot``: no global backend switch, no
figure registry to leak into, safe in Ray workers and headless drivers.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from proxyless_ray.nn.arch import Arch, parse_block

# Paper-like shades (Figure 4: blue 3x3, green 5x5, red 7x7), mid-saturation so black text stays readable.
KERNEL_COLOURS: dict[int, str] = {3: "#6fa8dc", 5: "#7cc47f", 7: "#e8756a"}
_EXTRA_COLOURS = ("#b48ad6", "#f2b134", "#4bb3b0", "#d67fb4")
FIXED_COLOUR = "#bdbdbd"  # stem, feature mix, classifier
ZERO_COLOUR = "black"  # the zero op in line plots
GAP_EDGE = "#808080"
EXP_LINESTYLES: dict[int, str | tuple] = {1: ":", 3: "--", 6: "-"}
DPI = 150


def kernel_colour(kernel_size: int) -> str:
    """Colour of a kernel size: the paper's blue/green/red for 3/5/7, a stable extra colour otherwise."""
    if kernel_size in KERNEL_COLOURS:
        return KERNEL_COLOURS[kernel_size]
    return _EXTRA_COLOURS[(kernel_size // 2) % len(_EXTRA_COLOURS)]


def exp_width(exp_ratio: int) -> float:
    """Box width (slot pitch = 1) of an expansion ratio: monotonic, e1 0.39 < e3 0.57 < e6 0.84, capped at 0.95."""
    return min(0.95, 0.3 + 0.09 * exp_ratio)


def exp_linestyle(exp_ratio: int) -> str | tuple:
    """Line style of an expansion ratio in line plots (e6 solid, e3 dashed, e1 dotted)."""
    return EXP_LINESTYLES.get(exp_ratio, "-.")


def block_label(block: str) -> str:
    """Short human label: ``MB6 5x5``, ``Conv 3x3``, ``zero``, ``Pool FC``."""
    if block.startswith("fc_c"):
        return "Pool FC"
    b = parse_block(block)
    if b.is_zero:
        return "zero"
    k = f"{b.kernel_size}x{b.kernel_size}"
    return f"MB{b.exp_ratio} {k}" if b.kind == "mb" else f"Conv {k}"


def block_colour(block: str) -> str:
    """Fill colour of a block in the arch picture and bar charts: kernel colour for MBConv, grey otherwise."""
    if block.startswith("fc_c"):
        return FIXED_COLOUR
    b = parse_block(block)
    if b.kind == "mb":
        return kernel_colour(b.kernel_size)
    return "none" if b.is_zero else FIXED_COLOUR


# -- saving ---------------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def check_out_path(path: str | os.PathLike) -> str:
    """Return ``path`` as a string; raise FileNotFoundError naming its folder when that does not exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} for {os.path.basename(path)!r} does not exist")
    return path


def save_png(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG atomically (temp file in the same folder, then ``os.replace``) and release it.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: naming the folder when it does not exist; nothing is left behind on any failure.
    """
    path = check_out_path(path)
    # A fresh random name rather than mkstemp: the file gets the umask's permissions, not mkstemp's 0600.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{uuid.uuid4().hex[:12]}.png")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        fig.clear()  # figures never enter pyplot's registry; clearing drops the artists right away
    return path


# -- architecture picture -------------------------------------------------------------------------------------------

_STAGE_GAP = 0.45  # extra horizontal space between stages, in slot pitches
_MIN_H, _MAX_H = 0.55, 1.0  # box heights span log2(channels) between these


@dataclass(frozen=True)
class BoxSpec:
    """One box of the arch picture.

    Attributes:
        label: Text inside the box, e.g. ``MB6 5x5``.
        colour: Fill colour (``"none"`` for a gap).
        width: Box width in slot pitches (expansion ratio for MBConv).
        is_gap: True for a zero layer: drawn as a dashed empty slot.
        height: Box height (log of channels).
        x: Centre of the box.
        block: The block string (``fc_c<N>`` for the classifier).
        kind: ``"stem"``, ``"block"``, ``"mix"`` or ``"fc"``.
        stage: Stage index (-1 stem, ``len(stages)`` head).
        stride: 2 where the block downsamples.
        out_chs: Output channels.
        out_res: Output resolution.
    """

    label: str
    colour: str
    width: float
    is_gap: bool
    height: float
    x: float
    block: str
    kind: str
    stage: int
    stride: int
    out_chs: int
    out_res: int


def arch_boxes(arch: Arch) -> list[BoxSpec]:
    """The boxes :func:`plot_arch` draws, left to right: stem, every block (zero as a gap), feature mix, classifier.

    Args:
        arch: The architecture; zero layers kept in place become gaps.

    Returns:
        One :class:`BoxSpec` per layer of ``arch.layers()``.
    """
    layers = arch.layers()
    n_stages = len(arch.stages)
    log_chs = [math.log2(max(1, layer.out_chs)) for layer in layers]
    lo, hi = min(log_chs), max(log_chs)
    boxes: list[BoxSpec] = []
    x, prev_stage = 0.0, None
    for i, (layer, lc) in enumerate(zip(layers, log_chs)):
        if prev_stage is not None and layer.stage != prev_stage:
            x += _STAGE_GAP
        height = _MAX_H if hi == lo else _MIN_H + (_MAX_H - _MIN_H) * (lc - lo) / (hi - lo)
        if layer.block.startswith("fc_c"):
            kind, width, stride, is_gap = "fc", 0.6, 1, False
        else:
            b = parse_block(layer.block)
            is_gap, stride = b.is_zero, b.stride
            if i == 0:
                kind, width = "stem", 0.6
            elif layer.stage == n_stages:
                kind, width = "mix", 0.6
            else:
                kind, width = "block", exp_width(b.exp_ratio) if b.kind == "mb" else 0.6
            if is_gap:
                width = exp_width(3)
        out_res = (layer.resolution + stride - 1) // stride
        boxes.append(BoxSpec(block_label(layer.block), block_colour(layer.block), width, is_gap, height, x,
                             layer.block, kind, layer.stage, stride, layer.out_chs, out_res))
        prev_stage = layer.stage
        x += 1.0
    return boxes


def draw_arch(ax: Axes, arch: Arch) -> list[Rectangle]:
    """Draw the arch picture into ``ax``; return the box patches (gid ``block``, ``gap`` or ``fixed``)."""
    boxes = arch_boxes(arch)
    patches: list[Rectangle] = []
    y_chs, y_top = -_MAX_H / 2 - 0.12, _MAX_H / 2 + 0.1
    for bx in boxes:
        gid = "gap" if bx.is_gap else ("block" if bx.kind == "block" else "fixed")
        rect = Rectangle((bx.x - bx.width / 2, -bx.height / 2), bx.width, bx.height, gid=gid,
                         facecolor="none" if bx.is_gap else bx.colour,
                         edgecolor=GAP_EDGE if bx.is_gap else "#333333",
                         linestyle="--" if bx.is_gap else "-", linewidth=0.9 if bx.is_gap else 0.7)
        ax.add_patch(rect)
        patches.append(rect)
        ax.text(bx.x, 0, "skip" if bx.is_gap else bx.label, rotation=90, ha="center", va="center",
                fontsize=7.5, color=GAP_EDGE if bx.is_gap else "black", style="italic" if bx.is_gap else "normal")
        if not bx.is_gap:
            ax.text(bx.x, y_chs, str(bx.out_chs), ha="center", va="top", fontsize=6.5, color="#444444")
        if bx.stride == 2:
            ax.text(bx.x, bx.height / 2 + 0.03, "s2", ha="center", va="bottom", fontsize=6.5,
                    color="#a00000", fontweight="bold")
    # Stage separators and each stage's output resolution above it.
    stages: dict[int, list[BoxSpec]] = {}
    for bx in boxes:
        stages.setdefault(bx.stage, []).append(bx)
    order = sorted(stages)
    for si, prev in zip(order[1:], order[:-1]):
        sep = (stages[prev][-1].x + stages[si][0].x) / 2
        ax.plot([sep, sep], [-_MAX_H / 2, _MAX_H / 2], color="#9e9e9e", linestyle=":", linewidth=0.8)
    for si in order:
        group = [b for b in stages[si] if b.kind != "fc"]
        if not group:
            continue
        centre = (group[0].x + group[-1].x) / 2
        ax.text(centre, y_top + 0.12, f"{group[-1].out_res}²", ha="center", va="bottom", fontsize=7, color="#555555")
    left = boxes[0].x - 0.55
    ax.text(left, 0, f"{arch.resolution}×{arch.resolution}×{arch.in_chs}  →", ha="right", va="center", fontsize=8)
    ax.text(left, y_top + 0.12, "resolution", ha="right", va="bottom", fontsize=7, color="#555555")
    ax.text(left, y_chs, "channels", ha="right", va="top", fontsize=6.5, color="#444444")
    ax.set_xlim(left - 0.1, boxes[-1].x + 0.6)
    ax.set_ylim(y_chs - 0.2, y_top + 0.4)
    ax.set_axis_off()
    return patches


def _arch_legend(ax: Axes, arch: Arch) -> None:
    blocks = [parse_block(b) for b in arch.blocks()]
    kernels = sorted({b.kernel_size for b in blocks if b.kind == "mb"})
    handles = [Patch(facecolor=kernel_colour(k), edgecolor="#333333", label=f"{k}x{k} kernel") for k in kernels]
    handles.append(Patch(facecolor=FIXED_COLOUR, edgecolor="#333333", label="fixed (stem / head)"))
    if any(b.is_zero for b in blocks):
        handles.append(Patch(facecolor="none", edgecolor=GAP_EDGE, linestyle="--", label="zero (layer skipped)"))
    handles.append(Line2D([], [], linestyle="none", marker="$s2$", color="#a00000", markersize=9, label="stride 2"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), frameon=False,
              fontsize=7.5, handlelength=1.6, columnspacing=1.4)


def plot_arch(arch: Arch, path: str | os.PathLike, title: str | None = None, latency_ms: float | None = None) -> str:
    """Draw an architecture as a row of boxes (ProxylessNAS Figure 4 style) and save it as PNG.

    Colour encodes the kernel size (3 blue, 5 green, 7 red), box width the expansion ratio (MB1 < MB3 < MB6), box
    height log2 of the output channels; zero layers kept in place show as dashed empty slots, the stem, feature mix
    and classifier in grey. Stages are separated by dotted lines with their output resolution above them.

    Args:
        arch: The architecture.
        path: Output PNG path; its folder must exist.
        title: Figure title; defaults to the arch name.
        latency_ms: Optional predicted total latency, written as a caption.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: If the output folder does not exist.
    """
    path = check_out_path(path)
    boxes = arch_boxes(arch)
    span = boxes[-1].x - boxes[0].x + 1
    fig = new_figure(max(6.0, 0.42 * span + 1.6), 2.7)
    ax = fig.add_axes((0.0, 0.2, 1.0, 0.7))
    draw_arch(ax, arch)
    _arch_legend(ax, arch)
    n_blocks = len(arch.blocks())
    n_zero = sum(b == "zero" for b in arch.blocks())
    heading = title if title is not None else (arch.name or "architecture")
    ax.set_title(f"{heading}  ({n_blocks - n_zero} blocks" + (f", {n_zero} skipped)" if n_zero else ")"),
                 fontsize=10, loc="left")
    caption = "box width ∝ expansion ratio, height ∝ log channels"
    if latency_ms is not None:
        caption = f"predicted latency: {latency_ms:.3g} ms    ·    " + caption
    fig.text(0.5, 0.0, caption, ha="center", va="bottom", fontsize=8, color="#333333")
    return save_png(fig, path)
