"""What identifies a run: the tags of a search or trial run and the experiment config as params.

Tags say what was searched, on which data, against which hardware and with which loss, so runs can be filtered in
the UI and by :func:`proxyless_ray.tracking.results.results_table`; params are the flattened experiment config.
"""

from __future__ import annotations

import json
from typing import Any

from proxyless_ray.config import Experiment, flatten
from proxyless_ray.latency.target import HardwareTarget, target_info

MAX_PARAM_LEN = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000  # MLflow's MAX_TAG_VAL_LENGTH


def profile_info(spec: str) -> dict[str, str]:
    """``hardware`` (the profile's name, which names the registered models), ``device`` and ``platform`` of a target
    known only by its spec (:func:`proxyless_ray.latency.target.target_info`; a resolved target has ``info()``)."""
    return target_info(spec)


def search_tags(exp: Experiment, kind: str, trial_key: str, target: HardwareTarget | None = None) -> dict[str, str]:
    """The tags of a child run: what was searched, on which data, against which hardware and loss.

    Args:
        exp: The trial's (or single search's) experiment.
        kind: ``trial`` (one trial of a sweep) or ``search`` (a single search).
        trial_key: What identifies the trial across restarts (a Tune trial id, or the output folder).
        target: The experiment's resolved hardware target (read from ``exp.latency.profile`` when None).
    """
    lat = exp.latency
    tags = {"kind": kind, "trial_key": trial_key, "profile": lat.profile, "loss": lat.loss,
            "dataset": exp.data.name if exp.data.path is None else f"{exp.data.name}:{exp.data.path}",
            "space_fingerprint": exp.space.fingerprint(), "gate_mode": exp.train.gate_mode, "name": exp.name,
            **(target.info() if target is not None else profile_info(lat.profile))}
    if lat.loss == "add":
        tags.update({"lambda": f"{lat.lam:g}", "ref_ms": f"{lat.ref_ms:g}"})
    elif lat.loss == "mul_log":
        tags.update({"alpha": f"{lat.alpha:g}", "beta": f"{lat.beta:g}", "target_ms": f"{lat.target_ms:g}"})
    return tags


def experiment_params(exp: Experiment) -> dict[str, str]:
    """The flattened experiment config as MLflow params (stringified, cut to MLflow's length limit)."""
    return {k: text_value(v, MAX_PARAM_LEN) for k, v in flatten(exp.to_dict()).items()}


def text_value(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quoted(value: str) -> str:
    """``value`` as a literal in an MLflow filter string."""
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise ValueError(f"a run key cannot hold both quote characters: {value!r}")
