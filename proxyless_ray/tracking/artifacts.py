"""What a child run holds besides metrics: the files of a search's output folder, its pictures and its profile.

The pictures are rendered into ``<out>/plots/`` (so the local folder holds everything the run does):

* ``arch.png`` -- the searched architecture with zero layers kept as gaps (ProxylessNAS Figure 4 style);
* ``alpha_heatmap.png`` / ``alpha_evolution.png`` -- architecture probabilities at the end and over epochs;
* ``latency_breakdown.png`` -- the derived network's predicted latency per layer on the target profile.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from proxyless_ray.latency.profile import list_profiles
from proxyless_ray.nn.arch import Arch
from proxyless_ray.plots import plot_alpha_evolution, plot_alpha_heatmap, plot_arch, plot_latency_breakdown

PLOTS_DIR = "plots"
TOP_FILES = ("arch.json", "searched_arch.json", "result.json", "metrics.jsonl", "alphas.json")
NETWORK_FILES = ("arch.json", "state_dict.pt", "model.pt2")


def render_search_plots(out_dir: str) -> list[str]:
    """Draw the pictures of a finished search into ``<out_dir>/plots/``.

    Args:
        out_dir: A search output folder (:func:`proxyless_ray.search.results.write_search_outputs`).

    Returns:
        The PNG paths written.
    """
    folder = os.path.join(out_dir, PLOTS_DIR)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(out_dir, "result.json")) as fh:
        result = json.load(fh)
    title = f"{result.get('name', '')} on {result.get('profile', '')}"
    searched = Arch.load(os.path.join(out_dir, "searched_arch.json"))
    paths = [plot_arch(searched, os.path.join(folder, "arch.png"), title=title, latency_ms=result.get("latency_ms"))]
    with open(os.path.join(out_dir, "alphas.json")) as fh:
        alphas = json.load(fh)
    candidates, history = alphas["candidates"], alphas["history"]
    if history and candidates:
        paths.append(plot_alpha_heatmap(history[-1], candidates, os.path.join(folder, "alpha_heatmap.png"),
                                        title=f"architecture probabilities after epoch {len(history)}"))
        paths.append(plot_alpha_evolution(history, candidates, os.path.join(folder, "alpha_evolution.png")))
    per_layer = [(layer["block"], layer["ms"]) for layer in result.get("per_layer_ms", [])]
    if per_layer:
        paths.append(plot_latency_breakdown(per_layer, os.path.join(folder, "latency_breakdown.png"),
                                            title=f"predicted latency on {result.get('profile', '')}"))
    return paths


def profile_files(spec: str | None) -> list[str]:
    """The file(s) of a hardware profile (its YAML and a Parquet side table if it names one); none for ``flops``."""
    if not spec or spec == "flops":
        return []
    if os.path.isfile(spec):
        path = spec
    else:
        known = list_profiles()
        if spec not in known:
            return []
        path = str(known[spec])
    files = [path]
    with open(path) as fh:
        head = yaml.safe_load(fh) or {}
    side = head.get("entries_file") if isinstance(head, dict) else None
    if side and os.path.isfile(os.path.join(os.path.dirname(path), side)):
        files.append(os.path.join(os.path.dirname(path), side))
    return files


def search_artifacts(out_dir: str, profile: str | None) -> list[tuple[str, str | None]]:
    """``(local path, artifact folder)`` of everything a child run holds, for the files that exist.

    Args:
        out_dir: A search output folder.
        profile: The target profile's name or path (its file goes to ``profile/``).
    """
    files: list[tuple[str, str | None]] = [(os.path.join(out_dir, f), None) for f in TOP_FILES]
    files += [(os.path.join(out_dir, "network", f), "network") for f in NETWORK_FILES]
    plots = os.path.join(out_dir, PLOTS_DIR)
    if os.path.isdir(plots):
        files += [(os.path.join(plots, f), PLOTS_DIR) for f in sorted(os.listdir(plots)) if f.endswith(".png")]
    files += [(f, "profile") for f in profile_files(profile)]
    return [(path, dest) for path, dest in files if os.path.isfile(path)]


def upload_search_outputs(client, run_id: str, out_dir: str, profile: str | None,
                          max_mb: float) -> tuple[dict[str, Any], list[str]]:
    """Render the pictures and upload :func:`search_artifacts`, skipping files over ``max_mb``.

    Returns:
        ``result.json``'s content (empty if unreadable) and why the run must fail (empty when all went up).
    """
    reasons: list[str] = []
    result: dict[str, Any] = {}
    try:
        with open(os.path.join(out_dir, "result.json")) as fh:
            result = json.load(fh)
        render_search_plots(out_dir)
    except Exception as err:  # a picture must not lose a finished search's run
        reasons.append(f"rendering the search pictures failed: {type(err).__name__}: {err}")
    for path, dest in search_artifacts(out_dir, profile or result.get("profile")):
        mb = os.path.getsize(path) / 2**20
        shown = f"{dest}/{os.path.basename(path)}" if dest else os.path.basename(path)
        if mb > max_mb:
            reasons.append(f"artifact {shown} is {mb:.3g} MB, over tracking.max_artifact_mb={max_mb:g}")
            continue
        try:
            client.log_artifact(run_id, path, dest)
        except Exception as err:  # any upload error fails the run, not the driver
            reasons.append(f"uploading {shown} failed: {type(err).__name__}: {err}")
    return result, reasons


def final_tags(result: dict[str, Any]) -> dict[str, str]:
    """Tags from ``result.json``: derived and searched architecture strings, latency on the target."""
    tags = {"derived_arch": result.get("arch"), "searched_arch": result.get("searched_arch"),
            "latency_ms": None if result.get("latency_ms") is None else f"{result['latency_ms']:.6g}"}
    return {k: str(v) for k, v in tags.items() if v is not None}


def final_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The derived network's latency on the target (``derived_latency_ms``) and every shipped profile."""
    out = {}
    if isinstance(result.get("latency_ms"), (int, float)):
        out["derived_latency_ms"] = float(result["latency_ms"])
    for name, ms in (result.get("latency_on_profiles") or {}).items():
        out[f"derived_latency_{name}_ms"] = float(ms)
    return out
