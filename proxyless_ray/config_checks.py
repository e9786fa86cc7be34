"""Checks of an experiment's values: the range of every numeric field and the cross-field rules, each message
naming the bad value and what was expected (run by :class:`proxyless_ray.config.Experiment` when it is built).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import fields
from typing import Any

from proxyless_ray.choices import DATASETS, GATE_MODES, LOSSES, SCHEDULERS, WARMUP_METHODS, expected
from proxyless_ray.runtime import WAIT_POLICIES

# The checks take the Experiment being built (proxyless_ray.config imports this module, not the other way round).
Experiment = Any

# YAML key -> attribute where the user's name is not a Python identifier: the latency coefficient is ``lambda``
# everywhere a user sees it (experiment files, --set, MLflow params and tags, tables), ``lam`` only in code.
_ALIASES = {("latency", "lambda"): "lam"}
# Old spellings still read, with a message naming the new key: {(section, old key): new key}.
_OLD_KEYS = {("latency", "lam"): "lambda"}
WEIGHT_SHARING = ("nested", "separate")


# Allowed range of every numeric field, in interval notation ('[' includes the bound, '(' excludes it); list fields
# (arch_betas, lambdas, ...) apply it to each entry. NaN and infinity are refused for every number.
RANGES = {
    "data.heldout_size": "[0, inf)", "data.train_subset": "[0, inf)", "data.test_subset": "[0, inf)",
    "data.batch_size": "[1, inf)", "data.eval_batch_size": "[1, inf)", "data.loader_workers": "[0, inf)",
    "data.seed": "[0, inf)", "data.test_size": "[0, inf)", "data.cache_mb": "[0, inf)",
    "data.warmup_subset": "[0, inf)", "train.ready_acc": "[0, 1)", "train.ready_samples": "[0, inf)",
    "sweep.retrain_subset": "[0, inf)",
    "train.epochs": "[1, inf)", "train.warmup_epochs": "[0, inf)", "train.lr": "(0, inf)",
    "train.warmup_lr": "(0, inf)", "train.momentum": "[0, 1)", "train.weight_decay": "[0, inf)",
    "train.label_smoothing": "[0, 1)", "train.arch_lr": "(0, inf)", "train.arch_betas": "[0, 1)",
    "train.arch_eps": "(0, inf)", "train.arch_weight_decay": "[0, inf)", "train.arch_update_every": "[1, inf)",
    "train.arch_steps": "[1, inf)", "train.reinforce_baseline_decay": "[0, 1]", "train.alpha_init_std": "[0, inf)",
    "train.grad_clip": "[0, inf)", "train.seed": "[0, inf)", "train.threads": "[0, inf)",
    "train.max_steps_per_epoch": "[0, inf)", "train.finetune_epochs": "[0, inf)",
    "train.bn_recal_batches": "[1, inf)",
    "latency.alpha": "[0, inf)",  # lambda, ref_ms and target_ms: checked in validate() with their own reasons
    "dist.workers": "[0, inf)", "dist.cpus_per_worker": "(0, inf)", "dist.gpus_per_worker": "[0, inf)",
    "dist.resources_per_worker": "[0, inf)", "dist.checkpoint_every": "[1, inf)",
    "dist.checkpoints_to_keep": "[1, inf)", "dist.max_failures": "[-1, inf)", "dist.connect_timeout_s": "(0, inf)",
    "sweep.lambdas": "[0, inf)", "sweep.num_samples": "[1, inf)", "sweep.grace_period": "[1, inf)",
    "sweep.reduction_factor": "[2, inf)", "sweep.workers_per_trial": "[0, inf)",
    "sweep.max_concurrent_trials": "[0, inf)", "sweep.retrain_epochs": "[0, inf)",
    "tracking.max_artifact_mb": "(0, inf)",
    "space.resolution": "[1, inf)", "space.in_chs": "[1, inf)", "space.num_classes": "[2, inf)",
    "space.dropout": "[0, 1)",
}
# Output names become folder names under out_dir: one path component, no '..', no separators.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def check_range(where: str, value: float, interval: str) -> None:
    """Raise ``ValueError`` naming ``where`` when ``value`` lies outside ``interval`` (e.g. ``'[0, 1)'``)."""
    lo_text, hi_text = interval[1:-1].split(",")
    lo, hi = float(lo_text), float(hi_text)
    inside = (value >= lo if interval[0] == "[" else value > lo) and (value <= hi if interval[-1] == "]"
                                                                       else value < hi)
    if not inside:
        expected = {"[1, inf)": ">= 1", "[0, inf)": ">= 0", "(0, inf)": "> 0", "[2, inf)": ">= 2"}.get(
            interval, f"in {interval}")
        raise ValueError(f"{where} must be {expected}, got {value!r}")


def _check_ranges(exp: Experiment) -> None:
    for section in (f.name for f in fields(exp) if dataclasses.is_dataclass(getattr(exp, f.name))):
        for f in fields(getattr(exp, section)):
            v = getattr(getattr(exp, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{_shown(section, f.name)} must be a finite number, got {v!r}")
    for key, interval in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(exp, section), name)
        key = _shown(section, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{key} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{key} must be a finite number, got {v!r}")
            check_range(key, v, interval)
    for hw, targets in exp.sweep.targets_ms.items():
        for v in targets if isinstance(targets, (list, tuple)) else [targets]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):  # > 0: sweep_grid
                raise ValueError(f"sweep.targets_ms.{hw} must be a list of finite numbers, got {targets!r}")


def _shown(section: str, name: str) -> str:
    """A field as the user writes it (``latency.lambda``, not the attribute ``lam``)."""
    return next((f"{s}.{k}" for (s, k), v in _ALIASES.items() if s == section and v == name), f"{section}.{name}")


def validate(exp: Experiment) -> None:
    """Cross-field checks; every message names the bad value and what was expected."""
    t, lat, d = exp.train, exp.latency, exp.data
    for key in ("name", "out_dir"):
        if not isinstance(getattr(exp, key), str) or not getattr(exp, key):
            raise ValueError(f"{key} must be a non-empty string, got {getattr(exp, key)!r}")
    if not NAME_PATTERN.match(exp.name) or exp.name in (".", ".."):
        raise ValueError(f"name {exp.name!r} must be a plain folder name (letters, digits, '_', '-', '.', no '/' or "
                         f"'..'): outputs go to out_dir/name")
    _check_ranges(exp)
    if t.gate_mode not in GATE_MODES:
        raise ValueError(f"train.gate_mode {t.gate_mode!r} is unknown; expected one of {list(GATE_MODES)}")
    if lat.loss not in LOSSES:
        raise ValueError(f"latency.loss {lat.loss!r} is unknown; expected one of {list(LOSSES)}")
    if lat.lam < 0:
        raise ValueError(f"latency.lambda must be >= 0, got {lat.lam}")
    if lat.loss == "mul_log" and lat.target_ms < 0:
        raise ValueError(f"latency.target_ms must be > 0 for mul_log (0 picks E[lat] at init), got {lat.target_ms}")
    if lat.ref_ms < 0:
        raise ValueError(f"latency.ref_ms must be > 0 (0 picks E[lat] at init), got {lat.ref_ms}")
    if not 0 <= t.warmup_epochs <= t.epochs:
        raise ValueError(f"train.warmup_epochs {t.warmup_epochs} must be within [0, train.epochs={t.epochs}]")
    if t.arch_update_every < 1:
        raise ValueError(f"train.arch_update_every must be >= 1, got {t.arch_update_every}")
    for name in ("lr", "warmup_lr", "arch_lr"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be > 0, got {getattr(t, name)}")
    if d.name not in DATASETS:
        raise ValueError(f"data.name {d.name!r} is unknown; {expected(DATASETS)}")
    if d.batch_size < 1 or d.heldout_size < 0:
        raise ValueError(f"data.batch_size must be >= 1 and data.heldout_size >= 0, got {d.batch_size}, "
                         f"{d.heldout_size}")
    if exp.dist.workers < 0:
        raise ValueError(f"dist.workers must be >= 0, got {exp.dist.workers}")
    if t.weight_sharing not in WEIGHT_SHARING:
        raise ValueError(f"train.weight_sharing {t.weight_sharing!r} is unknown; expected one of "
                         f"{list(WEIGHT_SHARING)}")
    if t.wait_policy not in WAIT_POLICIES:
        raise ValueError(f"train.wait_policy {t.wait_policy!r} is unknown; expected one of {list(WAIT_POLICIES)}")
    if t.warmup_method not in WARMUP_METHODS:
        raise ValueError(f"train.warmup_method {t.warmup_method!r} is unknown; expected one of "
                         f"{list(WARMUP_METHODS)}")
    if t.ready_acc > 0 and t.ready_samples == 0:
        raise ValueError("train.ready_acc needs train.ready_samples >= 1 to measure readiness")
    if t.sync_bn and t.weight_sharing == "nested":
        raise ValueError("train.sync_bn works with train.weight_sharing: separate only (the nested op's BatchNorm "
                         "slices its channels, which SyncBatchNorm cannot)")
    if d.warmup_subset and d.name != "fashion_mnist":
        raise ValueError(f"data.warmup_subset applies to fashion_mnist; data.name is {d.name!r}")
    if d.warmup_subset and d.train_subset and d.warmup_subset < d.train_subset:
        raise ValueError(f"data.warmup_subset {d.warmup_subset} must be 0 or >= data.train_subset "
                         f"{d.train_subset} (the warm-up reads a superset of the search's images)")
    if exp.sweep.scheduler not in SCHEDULERS:
        raise ValueError(f"sweep.scheduler {exp.sweep.scheduler!r} does not exist; expected one of {list(SCHEDULERS)}")
