"""Search pictures: the architecture probabilities (softmax of ``alpha``) per mixed layer, at the end and over epochs.

Layers may have different candidate lists (ProxylessNAS offers the zero op only on stride-1, same-width layers,
https://arxiv.org/abs/1812.00332), so both pictures align candidates by their (kernel size, expansion ratio) column,
with zero last, instead of by index. Colours and line styles match :func:`proxyless_ray.plots.arch.plot_arch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from proxyless_ray.nn.arch import ZERO, parse_block
from proxyless_ray.plots.arch import (
    ZERO_COLOUR,
    check_out_path,
    exp_linestyle,
    kernel_colour,
    new_figure,
    save_png,
)

_ANNOTATE_MAX_CELLS = 250  # beyond this, numbers in cells become unreadable


def candidate_column(block: str) -> tuple:
    """Sort key and identity of a candidate's column: MBConv by (kernel, expansion), then zero, then anything else."""
    if block == ZERO:
        return (1, 0, 0, ZERO)
    try:
        b = parse_block(block)
    except ValueError:
        return (2, 0, 0, block)
    if b.kind != "mb":
        return (2, 0, 0, block)
    return (0, b.kernel_size, b.exp_ratio, "")


def column_label(col: tuple) -> str:
    """``MB6 5x5``, ``zero`` or the raw string for a column key of :func:`candidate_column`."""
    group, k, e, raw = col
    return f"MB{e} {k}x{k}" if group == 0 else raw


def column_style(col: tuple) -> tuple[str, str | tuple]:
    """(colour, linestyle) of a column: kernel colour and expansion linestyle, black solid for zero."""
    group, k, e, _ = col
    if group == 0:
        return kernel_colour(k), exp_linestyle(e)
    return (ZERO_COLOUR, "-") if group == 1 else ("#7f7f7f", "-.")


def _layer_columns(candidates: Sequence[Sequence[str]]) -> tuple[list[tuple], list[list[int]]]:
    """The union of columns in stable order, and per layer the column index of each of its candidates."""
    per_layer = []
    for i, cands in enumerate(candidates):
        keys = [candidate_column(c) for c in cands]
        if len(set(keys)) != len(keys):
            raise ValueError(f"layer {i} has candidates sharing a (kernel, expansion) column: {list(cands)}")
        per_layer.append(keys)
    columns = sorted({k for keys in per_layer for k in keys})
    index = {c: j for j, c in enumerate(columns)}
    return columns, [[index[k] for k in keys] for keys in per_layer]


def _check_rows(rows: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]], where: str) -> list[np.ndarray]:
    if len(rows) != len(candidates):
        raise ValueError(f"{where}: {len(rows)} probability rows for {len(candidates)} candidate lists; expected one "
                         f"row per mixed layer")
    out = []
    for i, (row, cands) in enumerate(zip(rows, candidates)):
        arr = np.asarray(row, dtype=float).reshape(-1)
        if arr.size != len(cands):
            raise ValueError(f"{where}: layer {i} has {arr.size} probabilities for {len(cands)} candidates")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: layer {i} has non-finite probabilities {arr.tolist()}")
        out.append(arr)
    return out


def _layer_name(i: int, cands: Sequence[str]) -> str:
    """``L3 c40 s2`` from the layer's first MBConv candidate (all candidates share width and stride)."""
    for c in cands:
        if candidate_column(c)[0] == 0:
            b = parse_block(c)
            return f"L{i} c{b.out_chs} s{b.stride}"
    return f"L{i}"


def plot_alpha_heatmap(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]],
                       path: str | os.PathLike, title: str | None = None) -> str:
    """Layer x candidate heatmap of the architecture probabilities, argmax boxed per row.

    Args:
        probs: One 1-D array per mixed layer (lengths may differ: zero is not a candidate everywhere).
        candidates: The matching candidate block strings per layer (``SearchSpace.slots()[i].candidates``).
        path: Output PNG path; its folder must exist.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: If rows and candidate lists do not match.
        FileNotFoundError: If the output folder does not exist.
    """
    path = check_out_path(path)
    rows = _check_rows(probs, candidates, "plot_alpha_heatmap")
    if not rows:
        raise ValueError("plot_alpha_heatmap: no mixed layers to draw")
    columns, col_idx = _layer_columns(candidates)
    grid = np.full((len(rows), len(columns)), np.nan)
    for i, (row, idx) in enumerate(zip(rows, col_idx)):
        grid[i, idx] = row
    n_rows, n_cols = grid.shape
    fig = new_figure(2.2 + 0.8 * n_cols, 1.3 + 0.3 * n_rows)
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="probability")
    annotate = n_rows * n_cols <= _ANNOTATE_MAX_CELLS
    for i, (row, idx) in enumerate(zip(rows, col_idx)):
        best = idx[int(np.argmax(row))]
        ax.add_patch(Rectangle((best - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2.0,
                               gid="argmax", zorder=3))
        for j, value in zip(idx, row):
            if annotate:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 else "black", fontweight="bold" if j == best else "normal")
        for j in set(range(n_cols)) - set(idx):
            ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="#9e9e9e")
    ax.set_xticks(range(n_cols), [column_label(c) for c in columns], rotation=35, ha="right", fontsize=8)
    for tick, col in zip(ax.get_xticklabels(), columns):
        tick.set_color(column_style(col)[0] if col[0] == 0 else "black")
        tick.set_fontweight("bold")
    ax.set_yticks(range(n_rows), [_layer_name(i, c) for i, c in enumerate(candidates)], fontsize=7.5)
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("candidate (red box: argmax; – : not a candidate of this layer)", fontsize=8)
    ax.set_title(title or "architecture probabilities at the end of the search", fontsize=10, loc="left")
    return save_png(fig, path)


def plot_alpha_evolution(history: Sequence[Sequence[Sequence[float]]], candidates: Sequence[Sequence[str]],
                         path: str | os.PathLike, title: str | None = None) -> str:
    """Small multiples, one panel per mixed layer, with a line per candidate's probability over epochs.

    Colour is the kernel size and line style the expansion ratio (as in :func:`plot_arch`), zero is black; the
    candidate that wins at the last epoch is drawn thicker.

    Args:
        history: Per epoch, the per-layer probability rows (as for :func:`plot_alpha_heatmap`).
        candidates: Candidate block strings per layer.
        path: Output PNG path; its folder must exist.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: If the history is empty or an epoch's rows do not match the candidates.
        FileNotFoundError: If the output folder does not exist.
    """
    path = check_out_path(path)
    if not history:
        raise ValueError("plot_alpha_evolution: history is empty; expected one entry per epoch")
    epochs = [_check_rows(rows, candidates, f"plot_alpha_evolution epoch {e}") for e, rows in enumerate(history)]
    n_layers = len(candidates)
    if n_layers == 0:
        raise ValueError("plot_alpha_evolution: no mixed layers to draw")
    columns, col_idx = _layer_columns(candidates)
    n_cols = min(n_layers, 6 if n_layers > 12 else 5)
    n_rows = math.ceil(n_layers / n_cols)
    fig = new_figure(0.4 + 2.1 * n_cols, 0.9 + 1.55 * n_rows)
    axes = fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
    x = np.arange(len(epochs))
    marker = "o" if len(epochs) <= 2 else None  # a line needs two points; show single epochs as dots
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        traj = np.stack([ep[layer] for ep in epochs])  # epochs x candidates
        winner = int(np.argmax(traj[-1]))
        for c, j in enumerate(col_idx[layer]):
            colour, style = column_style(columns[j])
            ax.plot(x, traj[:, c], color=colour, linestyle=style, linewidth=2.2 if c == winner else 1.1,
                    marker=marker, markersize=3)
        ax.set_title(_layer_name(layer, candidates[layer]), fontsize=8, pad=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(-0.5 if len(epochs) == 1 else 0, max(0.5, len(epochs) - 1))
        if len(epochs) <= 5:
            ax.set_xticks(range(len(epochs)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
    for r in range(n_rows):
        axes[r, 0].set_ylabel("prob.", fontsize=8)
    for c in range(n_cols):  # the last row may have hidden panels: label the lowest visible panel of each column
        lowest = max(r for r in range(n_rows) if r * n_cols + c < n_layers)
        axes[lowest, c].tick_params(labelbottom=True)
        axes[lowest, c].set_xlabel("epoch", fontsize=8)
    handles = [Line2D([], [], color=column_style(c)[0], linestyle=column_style(c)[1], linewidth=1.6,
                      label=column_label(c)) for c in columns]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0), handlelength=2.8)
    fig.suptitle(title or "architecture probabilities over the search (thick: final argmax)", fontsize=10,
                 x=0.01, ha="left")
    # Fixed margins in inches instead of tight_layout, which re-measures every tick label of every panel (slow).
    width, height = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.1 / width, bottom=1.0 / height, top=1 - 0.6 / height,
                        wspace=0.12, hspace=0.5)
    return save_png(fig, path)
