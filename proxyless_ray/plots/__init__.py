"""The pictures users see in the MLflow UI and the sweep output folder, as PNG files written atomically.

* :func:`plot_arch` -- an architecture as a row of boxes, ProxylessNAS Figure 4 style (:mod:`.plots_arch`);
* :func:`plot_alpha_heatmap`, :func:`plot_alpha_evolution` -- architecture probabilities per mixed layer at the end
  of the search and over epochs (:mod:`.plots_search`);
* :func:`plot_pareto` -- held-out accuracy vs expected latency per hardware, front highlighted (here);
* :func:`plot_latency_breakdown` -- predicted latency per layer (here).

Every function builds a bare Agg figure (no ``pyplot``, no global backend change), saves it through a temp file in
the target folder plus ``os.replace`` and returns the path. Colours are shared: kernel 3/5/7 blue/green/red, grey for
fixed layers, black for zero.

ProxylessNAS: Cai, Zhu, Han, ICLR 2019, https://arxiv.org/abs/1812.00332
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from proxyless_ray.plots.arch import (
    GAP_EDGE,
    KERNEL_COLOURS,
    BoxSpec,
    arch_boxes,
    block_colour,
    block_label,
    check_out_path,
    draw_arch,
    new_figure,
    plot_arch,
    save_png,
)
from proxyless_ray.plots.search import plot_alpha_evolution, plot_alpha_heatmap

__all__ = [
    "KERNEL_COLOURS", "BoxSpec", "arch_boxes", "draw_arch", "plot_arch", "plot_alpha_heatmap",
    "plot_alpha_evolution", "plot_pareto", "plot_latency_breakdown", "SPLIT_RATIO",
]

PARETO_COLUMNS = ("hardware", "heldout_acc", "expected_latency_ms", "on_front")
# Hardware whose median latencies differ by more than this get one panel each: on a shared axis a GPU front around
# 0.1 ms and a phone front around 80 ms each shrink to a few pixels even with a log scale. Below it, one shared axis
# lets the fronts be compared directly. The same ratio within one panel switches its x-axis to log.
SPLIT_RATIO = 10.0


def _point_labels(rows: pd.DataFrame) -> list[str]:
    """The ``label`` column, else ``λ=<lambda>`` from a :func:`proxyless_ray.pareto.pareto_table`, else nothing."""
    if "label" in rows:
        return ["" if pd.isna(v) else str(v) for v in rows["label"]]
    if "lambda" in rows:
        return ["" if pd.isna(v) else f"λ={v:g}" for v in rows["lambda"]]
    return [""] * len(rows)


def _draw_hardware(ax: Axes, rows: pd.DataFrame, colour: Any, name: str,
                   labels: list[tuple[float, float, str]]) -> list[Line2D]:
    """Faint points, the front as a step line with highlighted members and target lines for one hardware.

    Front members' labels are appended to ``labels`` and placed once the axis scales are final.
    """
    lat, acc = rows["expected_latency_ms"].to_numpy(float), rows["heldout_acc"].to_numpy(float)
    ax.scatter(lat, acc, s=18, color=colour, alpha=0.3, linewidths=0, gid=f"all:{name}")
    front = rows[rows["on_front"].astype(bool)].sort_values("expected_latency_ms")
    handles = [Line2D([], [], color=colour, marker="o", markeredgecolor="black", label=f"{name} front")]
    if len(front):
        f_lat, f_acc = front["expected_latency_ms"].to_numpy(float), front["heldout_acc"].to_numpy(float)
        ax.step(f_lat, f_acc, where="post", color=colour, linewidth=1.6, zorder=2)
        ax.scatter(f_lat, f_acc, s=42, color=colour, edgecolors="black", linewidths=0.8, zorder=3,
                   gid=f"front:{name}")
        labels.extend((x, y, t) for x, y, t in zip(f_lat, f_acc, _point_labels(front)) if t)
    if "target_ms" in rows:
        for target in sorted(set(rows["target_ms"].dropna().astype(float))):
            ax.axvline(target, color=colour, linestyle="--", linewidth=1.0, alpha=0.8)
        if rows["target_ms"].notna().any():
            handles.append(Line2D([], [], color=colour, linestyle="--", label=f"{name} latency target"))
    return handles


def _place_labels(ax: Axes, labels: list[tuple[float, float, str]]) -> None:
    """Annotate points above-right, else below-right, else not at all, so that labels overlap neither each other
    nor the labelled markers.

    Call once the axis scales and the layout are final: positions are compared in points on the page.
    """
    ax.get_xlim()  # settles pending autoscaling, which transData alone does not
    scale = 72.0 / ax.figure.dpi
    points = [(x, y, text, *(v * scale for v in ax.transData.transform((x, y)))) for x, y, text in sorted(labels)]
    taken = [(px - 4, py - 4, px + 4, py + 4) for *_, px, py in points]  # the markers, ~8 pt across

    def free(box: tuple[float, float, float, float]) -> bool:
        return all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken)

    for x, y, text, px, py in points:
        width = 4.3 * len(text) + 2  # 7 pt DejaVu Sans averages ~4 pt per character
        for dy in (5.0, -12.0):
            box = (px + 4, py + dy, px + 4 + width, py + dy + 8)
            if free(box):
                ax.annotate(text, (x, y), xytext=(4, dy), textcoords="offset points", fontsize=7, color="#333333")
                taken.append(box)
                break


def _finish_axis(ax: Axes, lat: np.ndarray, ylabel: bool) -> None:
    if lat.min() > 0 and lat.max() / lat.min() > SPLIT_RATIO:
        ax.set_xscale("log")
    ax.set_xlabel("expected latency (ms)" + (", log scale" if ax.get_xscale() == "log" else ""), fontsize=9)
    if ylabel:
        ax.set_ylabel("held-out accuracy", fontsize=9)
    ax.grid(alpha=0.3, linewidth=0.5, which="both")
    ax.tick_params(labelsize=8)


def plot_pareto(table: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> str:
    """Held-out accuracy vs expected latency: every trial faint, each hardware's front highlighted as a step line.

    One colour per hardware. The fronts share one axis unless the hardware's median latencies differ by more than
    :data:`SPLIT_RATIO` (e.g. GPU 0.1 ms vs mobile 80 ms): then each hardware gets its own panel and x-axis, with a
    shared accuracy axis. A panel's latency axis is logarithmic when its latencies span more than that ratio.

    Args:
        table: Columns ``hardware``, ``heldout_acc``, ``expected_latency_ms``, ``on_front`` (bool); optional
            ``label`` (e.g. ``"λ=0.1"``, else made from ``lambda`` when present) and ``target_ms`` (dashed lines), as
            :func:`proxyless_ray.pareto.pareto_table` returns.
        path: Output PNG path; its folder must exist.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: If columns are missing or no row has both accuracy and latency.
        FileNotFoundError: If the output folder does not exist.
    """
    path = check_out_path(path)
    missing = [c for c in PARETO_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"plot_pareto: table lacks column(s) {missing}; got {list(table.columns)}, expected "
                         f"{list(PARETO_COLUMNS)} (+ optional label, target_ms)")
    rows = table.dropna(subset=["heldout_acc", "expected_latency_ms"])
    if rows.empty:
        raise ValueError(f"plot_pareto: none of the {len(table)} rows has both heldout_acc and expected_latency_ms")
    hardware = [str(h) for h in pd.unique(rows["hardware"].astype(str))]
    palette = colormaps["tab10"]
    colours = {h: palette(i % 10) for i, h in enumerate(hardware)}
    medians = [float(rows.loc[rows["hardware"].astype(str) == h, "expected_latency_ms"].median()) for h in hardware]
    split = len(hardware) > 1 and min(medians) > 0 and max(medians) / min(medians) > SPLIT_RATIO
    n_panels = len(hardware) if split else 1
    fig = new_figure(6.5 if n_panels == 1 else 4.4 * n_panels, 4.4)
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
    labels: list[list[tuple[float, float, str]]] = [[] for _ in axes]
    for i, ax in enumerate(axes):
        names = [hardware[i]] if split else hardware
        handles: list[Line2D] = []
        for h in names:
            handles += _draw_hardware(ax, rows[rows["hardware"].astype(str) == h], colours[h], h, labels[i])
        handles.append(Line2D([], [], color="#7f7f7f", marker="o", linestyle="none", alpha=0.35, label="all trials"))
        panel_rows = rows[rows["hardware"].astype(str).isin(names)]
        _finish_axis(ax, panel_rows["expected_latency_ms"].to_numpy(float), ylabel=i == 0)
        if split:
            ax.set_title(hardware[i], fontsize=9)
        ax.legend(handles=handles, fontsize=7.5, loc="lower right", framealpha=0.85)
    fig.suptitle(title or "accuracy vs latency (Pareto fronts per hardware)", fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    for ax, panel_labels in zip(axes, labels):
        _place_labels(ax, panel_labels)
    return save_png(fig, path)


def plot_latency_breakdown(per_layer: Sequence[tuple[Any, float]], path: str | os.PathLike,
                           title: str | None = None) -> str:
    """Bar chart of predicted latency per layer, coloured like :func:`plot_arch` (zero layers cost nothing).

    Args:
        per_layer: ``(block, lat_ms)`` pairs in network order; ``block`` is a block string (``fc_c<N>`` for the
            classifier) or a :class:`proxyless_ray.nn.arch.Layer`, so ``arch_latency(model, arch)[1]`` works as is.
        path: Output PNG path; its folder must exist.
        title: Figure title; the total latency is appended.

    Returns:
        The path written.

    Raises:
        ValueError: If ``per_layer`` is empty or a latency is negative or not finite.
        FileNotFoundError: If the output folder does not exist.
    """
    path = check_out_path(path)
    if not per_layer:
        raise ValueError("plot_latency_breakdown: per_layer is empty; expected (block, lat_ms) pairs")
    blocks = [str(getattr(b, "block", b)) for b, _ in per_layer]
    lat = np.array([float(ms) for _, ms in per_layer])
    if not np.all(np.isfinite(lat)) or (lat < 0).any():
        raise ValueError(f"plot_latency_breakdown: latencies must be finite and >= 0, got {lat.tolist()}")
    n = len(blocks)
    fig = new_figure(max(6.0, 0.3 * n + 1.5), 3.6)
    ax = fig.add_subplot()
    colours = [block_colour(b) for b in blocks]
    bars = ax.bar(range(n), lat, width=0.75, color=[c if c != "none" else "white" for c in colours],
                  edgecolor=["#333333" if c != "none" else GAP_EDGE for c in colours], linewidth=0.6)
    for bar, colour in zip(bars, colours):
        if colour == "none":
            bar.set_linestyle("--")
    ax.set_xticks(range(n), [f"{block_label(b)}" for b in blocks], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("predicted latency (ms)", fontsize=9)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax.tick_params(axis="y", labelsize=8)
    total = float(lat.sum())
    heading = title or "predicted latency per layer"
    ax.set_title(f"{heading}  (total {total:.3g} ms)", fontsize=10, loc="left")
    if total > 0:
        top = max(range(n), key=lambda i: lat[i])
        ax.annotate(f"{lat[top]:.2g} ms ({lat[top] / total:.0%})", (top, lat[top]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=7)
        ax.set_ylim(0, lat.max() * 1.15)
    fig.tight_layout()
    return save_png(fig, path)

