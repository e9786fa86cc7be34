"""Plots: every picture is a readable PNG, the layout logic encodes blocks as documented, saving is atomic."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import imread

from proxyless_ray import plots
from proxyless_ray.latency.model import FlopsLatencyModel, arch_latency
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.space import SearchSpace, space_from_preset
from proxyless_ray.plots import (
    arch_boxes,
    draw_arch,
    plot_alpha_evolution,
    plot_alpha_heatmap,
    plot_arch,
    plot_latency_breakdown,
    plot_pareto,
)
from proxyless_ray.plots import search as plots_search
from proxyless_ray.plots.arch import FIXED_COLOUR
from proxyless_ray.plots.search import candidate_column

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path, min_w: int = 300, min_h: int = 150) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    img = imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, f"{path} is only {w}x{h}"
    assert img.std() > 0.01, f"{path} is blank"
    return w, h


def no_temp_files(folder: Path) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(".tmp-")]


@pytest.fixture
def captured(monkeypatch):
    """Keep the figures that would be saved, so tests can inspect what was drawn."""
    figs: list[Figure] = []

    def fake_save(fig, path):
        figs.append(fig)
        return os.fspath(path)

    monkeypatch.setattr(plots, "save_png", fake_save)
    monkeypatch.setattr(plots_search, "save_png", fake_save)
    return figs


# Spelled out rather than the "small" preset, whose widths may be retuned: these tests pin exact block strings.
SMALL_SPACE = SearchSpace(
    preset="plots-test", resolution=28, in_chs=1, num_classes=10, stem="conv_k3_c16_s1",
    first_block="mb_k3_e1_c16_s1", widths=(24, 40, 80, 96), depths=(2, 3, 3, 2), strides=(2, 2, 2, 1),
    kernel_sizes=(3, 5, 7), exp_ratios=(3, 6), zero_op=True, feature_mix_chs=256,
)


def get_space(name: str) -> SearchSpace:
    return SMALL_SPACE if name == "small" else space_from_preset(name)


def small_arch(blocks: list[str]) -> Arch:
    return SMALL_SPACE.arch_from_blocks(blocks, name="t")


SMALL_BLOCKS = [
    "mb_k3_e3_c24_s2", "mb_k5_e6_c24_s1",
    "mb_k7_e3_c40_s2", "zero", "mb_k3_e6_c40_s1",
    "mb_k5_e3_c80_s2", "mb_k7_e6_c80_s1", "zero",
    "mb_k3_e3_c96_s1", "zero",
]


def random_alphas(space, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for slot in space.slots():
        logits = rng.normal(0, 2, len(slot.candidates))
        out.append(np.exp(logits) / np.exp(logits).sum())
    return out


# -- arch picture ------------------------------------------------------------------------------------------------


def test_arch_boxes_encode_kernel_expansion_and_zero():
    arch = small_arch(SMALL_BLOCKS)
    boxes = arch_boxes(arch)
    assert len(boxes) == len(arch.layers())
    assert [b.kind for b in boxes][:2] == ["stem", "block"] and [b.kind for b in boxes][-2:] == ["mix", "fc"]
    blocks = [b for b in boxes if b.kind == "block"]
    assert [b.block for b in blocks] == arch.blocks()
    by_block = {b.block: b for b in blocks}
    # kernel -> colour: one colour per kernel size, three distinct ones
    assert by_block["mb_k3_e3_c24_s2"].colour == by_block["mb_k3_e6_c40_s1"].colour
    colours = {by_block[k].colour for k in ("mb_k3_e3_c24_s2", "mb_k5_e6_c24_s1", "mb_k7_e3_c40_s2")}
    assert len(colours) == 3 and "none" not in colours
    # expansion -> width: e1 < e3 < e6 whatever the kernel
    e1 = by_block["mb_k3_e1_c16_s1"].width
    assert e1 < by_block["mb_k7_e3_c40_s2"].width < by_block["mb_k5_e6_c24_s1"].width
    assert by_block["mb_k3_e3_c24_s2"].width == by_block["mb_k7_e3_c40_s2"].width
    # zero -> gap, only there
    assert [b.is_gap for b in blocks] == [b == "zero" for b in arch.blocks()]
    # fixed layers are grey, boxes run left to right, stride-2 blocks are marked
    assert boxes[0].colour == boxes[-1].colour == FIXED_COLOUR
    xs = [b.x for b in boxes]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert [b.block for b in blocks if b.stride == 2] == ["mb_k3_e3_c24_s2", "mb_k7_e3_c40_s2", "mb_k5_e3_c80_s2"]


def test_arch_box_height_grows_with_channels():
    boxes = [b for b in arch_boxes(small_arch(SMALL_BLOCKS)) if not b.is_gap]
    by_chs = sorted(boxes, key=lambda b: b.out_chs)
    assert all(a.height <= b.height for a, b in zip(by_chs, by_chs[1:]))
    assert by_chs[0].height < by_chs[-1].height


def test_draw_arch_draws_one_patch_per_block():
    arch = small_arch(SMALL_BLOCKS)
    fig = Figure()
    ax = fig.add_subplot()
    patches = draw_arch(ax, arch)
    gids = [p.get_gid() for p in ax.patches]
    assert len(patches) == len(arch.layers())
    assert gids.count("block") + gids.count("gap") == len(arch.blocks())
    assert gids.count("gap") == arch.blocks().count("zero") == 3
    gap = next(p for p in ax.patches if p.get_gid() == "gap")
    assert gap.get_linestyle() == "--" and gap.get_facecolor()[3] == 0  # dashed outline, empty inside
    fills = {p.get_facecolor() for p in ax.patches if p.get_gid() == "block"}
    assert to_rgba(plots.KERNEL_COLOURS[7]) in fills


def test_plot_arch_writes_png_and_scales_with_block_count(tmp_path):
    small = plot_arch(small_arch(SMALL_BLOCKS), tmp_path / "small.png", latency_ms=1.23)
    space = space_from_preset("proxyless_imagenet")
    choices = [int(np.argmax(p)) for p in random_alphas(space)]
    big = plot_arch(space.arch_from_choices(choices, name="argmax"), tmp_path / "big.png", title="ImageNet argmax")
    assert small == str(tmp_path / "small.png")
    w_small, _ = assert_png(small)
    w_big, _ = assert_png(big)
    assert w_big > 1.3 * w_small
    assert no_temp_files(tmp_path)


def test_plot_arch_published_gpu_config(tmp_path, reference):
    arch = Arch.load(reference("proxylessnas", "proxyless_gpu.config"))
    assert sum(b.is_gap for b in arch_boxes(arch)) == arch.blocks().count("zero") > 0
    assert_png(plot_arch(arch, tmp_path / "gpu.png", latency_ms=5.1))


# -- search pictures ---------------------------------------------------------------------------------------------


def test_candidate_columns_are_kernels_by_expansions_then_zero():
    cands = SMALL_SPACE.slots()[1].candidates
    shuffled = list(cands)
    random.Random(0).shuffle(shuffled)
    order = sorted({candidate_column(c) for c in shuffled})
    assert [plots_search.column_label(c) for c in order] == [
        "MB3 3x3", "MB6 3x3", "MB3 5x5", "MB6 5x5", "MB3 7x7", "MB6 7x7", "zero"]


def test_heatmap_ragged_rows(tmp_path, captured):
    space = SMALL_SPACE
    cands = [s.candidates for s in space.slots()]
    probs = random_alphas(space)
    assert {len(p) for p in probs} == {6, 7}  # the small space mixes layers with and without zero
    plot_alpha_heatmap(probs, cands, tmp_path / "heat.png")
    ax = captured[0].axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (len(cands), 7)
    assert int(np.ma.count_masked(grid)) == sum(not s.has_zero for s in space.slots())
    assert grid.mask[0, -1] and not grid.mask[1, -1]  # layer 0 has stride 2: no zero candidate
    argmax = [p for p in ax.patches if p.get_gid() == "argmax"]
    assert len(argmax) == len(cands)
    assert argmax[0].get_x() + 0.5 == int(np.argmax(probs[0]))


def test_heatmap_writes_png_and_rejects_mismatched_rows(tmp_path):
    space = space_from_preset("proxyless_imagenet")
    cands = [s.candidates for s in space.slots()]
    assert_png(plot_alpha_heatmap(random_alphas(space), cands, tmp_path / "heat.png"))
    bad = random_alphas(space)
    bad[3] = bad[3][:-1]
    with pytest.raises(ValueError, match="layer 3 has"):
        plot_alpha_heatmap(bad, cands, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="one row per mixed layer"):
        plot_alpha_heatmap(bad[:-1], cands, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("preset,n_epochs", [("small", 5), ("proxyless_imagenet", 3), ("small", 1)])
def test_alpha_evolution_png(tmp_path, preset, n_epochs):
    space = get_space(preset)
    cands = [s.candidates for s in space.slots()]
    history = [random_alphas(space, seed=e) for e in range(n_epochs)]
    assert_png(plot_alpha_evolution(history, cands, tmp_path / "evo.png"), min_w=600, min_h=250)


def test_alpha_evolution_panels_and_styles(tmp_path, captured):
    space = SMALL_SPACE
    cands = [s.candidates for s in space.slots()]
    plot_alpha_evolution([random_alphas(space, seed=e) for e in range(4)], cands, tmp_path / "evo.png")
    visible = [ax for ax in captured[0].axes if ax.get_visible()]
    assert len(visible) == len(cands)
    lines = visible[1].get_lines()  # layer 1 has zero: 7 candidates
    assert len(lines) == 7
    assert to_rgba(lines[-1].get_color()) == to_rgba("black")  # zero is black
    assert to_rgba(lines[0].get_color()) == to_rgba(plots.KERNEL_COLOURS[3])
    assert lines[0].get_linestyle() != lines[1].get_linestyle()  # e3 vs e6


def test_alpha_evolution_rejects_bad_history(tmp_path):
    space = SMALL_SPACE
    cands = [s.candidates for s in space.slots()]
    with pytest.raises(ValueError, match="empty"):
        plot_alpha_evolution([], cands, tmp_path / "evo.png")
    with pytest.raises(ValueError, match="epoch 1"):
        plot_alpha_evolution([random_alphas(space), random_alphas(space)[:-1]], cands, tmp_path / "evo.png")


# -- results pictures --------------------------------------------------------------------------------------------


def pareto_table(scales: dict[str, float], n: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for hw, scale in scales.items():
        lat = scale * (1 + rng.uniform(0, 2, n))
        acc = 0.5 + 0.1 * np.log(lat / scale) + rng.normal(0, 0.02, n)
        for i in range(n):
            rows.append(dict(hardware=hw, heldout_acc=acc[i], expected_latency_ms=lat[i], on_front=False,
                             label=f"λ={i / 10:g}", target_ms=2 * scale))
    table = pd.DataFrame(rows)
    for hw in scales:  # a one-point front per hardware: the most accurate trial
        best = table[table["hardware"] == hw]["heldout_acc"].idxmax()
        table.loc[best, "on_front"] = True
    return table


def test_pareto_two_hardware_one_point_fronts_shared_axis(tmp_path, captured):
    plot_pareto(pareto_table({"cpu": 10.0, "cpu8": 20.0}), tmp_path / "p.png")
    axes = captured[0].axes
    assert len(axes) == 1 and axes[0].get_xscale() == "linear"
    fronts = [c for c in axes[0].collections if str(c.get_gid()).startswith("front:")]
    assert [len(c.get_offsets()) for c in fronts] == [1, 1]
    assert sum(str(c.get_gid()).startswith("all:") for c in axes[0].collections) == 2


def test_pareto_splits_panels_across_latency_scales(tmp_path, captured):
    plot_pareto(pareto_table({"gpu": 0.1, "mobile": 80.0}), tmp_path / "p.png")
    axes = captured[0].axes
    assert [ax.get_title() for ax in axes] == ["gpu", "mobile"]


def test_pareto_log_axis_when_range_is_wide(tmp_path, captured):
    table = pareto_table({"cpu": 1.0})
    table.loc[0, "expected_latency_ms"] = 50.0
    plot_pareto(table.drop(columns=["label"]), tmp_path / "p.png")
    assert captured[0].axes[0].get_xscale() == "log"


def test_pareto_png_and_missing_columns(tmp_path):
    assert_png(plot_pareto(pareto_table({"gpu": 0.1, "mobile": 80.0}), tmp_path / "p.png", title="sweep"))
    with pytest.raises(ValueError, match="on_front"):
        plot_pareto(pareto_table({"cpu": 1.0}).drop(columns=["on_front"]), tmp_path / "q.png")


def test_latency_breakdown_from_arch_latency(tmp_path):
    arch = small_arch(SMALL_BLOCKS)
    total, per_layer = arch_latency(FlopsLatencyModel(), arch)
    assert_png(plot_latency_breakdown(per_layer, tmp_path / "lat.png"))
    assert_png(plot_latency_breakdown([("conv_k3_c16_s1", 0.5), ("zero", 0.0), ("fc_c10", 0.1)], tmp_path / "b.png"))
    with pytest.raises(ValueError, match=">= 0"):
        plot_latency_breakdown([("zero", -1.0)], tmp_path / "c.png")


# -- atomic saving -----------------------------------------------------------------------------------------------


def test_missing_folder_names_it_and_leaves_nothing(tmp_path):
    missing = tmp_path / "no" / "such"
    arch = small_arch(SMALL_BLOCKS)
    expected = f"output folder {re.escape(repr(str(missing)))} .*does not exist"
    with pytest.raises(FileNotFoundError, match=expected):
        plot_arch(arch, missing / "arch.png")
    with pytest.raises(FileNotFoundError, match=expected):
        plot_pareto(pareto_table({"cpu": 1.0}), missing / "p.png")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "arch.png"
    target.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_arch(small_arch(SMALL_BLOCKS), target)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["arch.png"]


def test_plotting_leaves_pyplot_and_backend_alone(tmp_path):
    code = (
        "import sys\n"
        "from proxyless_ray.plots import plot_latency_breakdown\n"
        f"plot_latency_breakdown([('conv_k3_c16_s1', 0.5)], {str(tmp_path / 'b.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'plots imported pyplot'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "b.png", min_w=200, min_h=100)
