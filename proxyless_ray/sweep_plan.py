"""The sweep's plan: the grid of trials (hardware profiles x latency coefficients), each trial's experiment, the
shared warm-up's key, and the plan saved beside the sweep (``sweep.json``) so ``--resume`` runs the same trials.

Pure configuration: no Ray. :mod:`proxyless_ray.sweep` runs the plan on Ray Tune.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

from proxyless_ray.arch import atomic_write_text
from proxyless_ray.config import Experiment
from proxyless_ray.latency.model import load_latency_model_for

SWEEP_STATE = "sweep.json"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class TrialSpec:
    """One point of the sweep grid."""

    hardware: str
    loss: str
    lam: float | None = None
    beta: float | None = None
    target_ms: float | None = None

    @property
    def key(self) -> str:
        """Stable, filesystem-safe trial name, e.g. ``pixel1-add-lam0.1``."""
        parts = [self.hardware, self.loss]
        for name in ("lam", "beta", "target_ms"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name.replace('_ms', '')}{v:g}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "loss": self.loss, "lam": self.lam, "beta": self.beta,
                "target_ms": self.target_ms, "key": self.key}


@dataclass
class SweepPlan:
    """Everything the sweep driver decided before Tune starts (saved as ``sweep.json`` for resume)."""

    trials: list[TrialSpec]
    warmup_key: str | None = None
    warmup_checkpoint: str | None = None
    parent_run_id: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# -- grid ----------------------------------------------------------------------------------------------------------


def sweep_grid(exp: Experiment) -> list[TrialSpec]:
    """Expand the experiment's ``sweep`` section into trial specs; clear errors for empty or invalid grids."""
    sw = exp.sweep
    if not sw.hardware:
        raise ValueError("sweep.hardware is empty; list the hardware profiles to sweep, e.g. [cpu_2threads, pixel1]")
    for hw in sw.hardware:
        load_latency_model_for(hw, exp.space)  # unknown profile or one for another space: an error naming it
    rng = random.Random(exp.train.seed)

    def values(name: str, given: tuple[float, ...] | list[float]) -> list[float]:
        vals = [float(v) for v in given]
        if sw.sampling == "log":
            bad = [v for v in vals if v <= 0]
            if bad:
                raise ValueError(f"sweep.{name} has {bad}: coefficients must be > 0 on a log scale")
            if not vals:
                return []
            lo, hi = math.log(min(vals)), math.log(max(vals))
            return sorted(round(math.exp(rng.uniform(lo, hi)), 6) for _ in range(sw.num_samples))
        if sw.sampling != "grid":
            raise ValueError(f"sweep.sampling {sw.sampling!r} is unknown; expected 'grid' or 'log'")
        return vals

    trials: list[TrialSpec] = []
    if sw.loss == "add":
        lams = values("lambdas", sw.lambdas)
        if any(v < 0 for v in lams):
            raise ValueError(f"sweep.lambdas {lams} holds a negative value; lambda must be >= 0")
        trials = [TrialSpec(hw, "add", lam=lam) for hw in sw.hardware for lam in lams]
    elif sw.loss == "mul_log":
        betas = values("betas", sw.betas) or [exp.latency.beta]
        unknown = sorted(set(sw.targets_ms) - set(sw.hardware))
        if unknown:
            raise ValueError(f"sweep.targets_ms names hardware {unknown} that is not in sweep.hardware")
        for hw in sw.hardware:
            targets = [float(t) for t in sw.targets_ms.get(hw, [])]
            if not targets:
                raise ValueError(f"sweep.targets_ms has no latency targets for hardware {hw!r}")
            bad = [t for t in targets if t <= 0]
            if bad:
                raise ValueError(f"sweep.targets_ms[{hw!r}] has {bad}: target latencies must be > 0 ms")
            trials += [TrialSpec(hw, "mul_log", beta=b, target_ms=t) for t in targets for b in betas]
    else:
        raise ValueError(f"sweep.loss {sw.loss!r} is unknown; expected 'add' or 'mul_log'")
    if not trials:
        raise ValueError("the sweep grid is empty: give sweep.lambdas (loss add) or sweep.targets_ms (loss mul_log)")
    return trials


def trial_experiment(exp: Experiment, spec: TrialSpec, sweep_dir: str) -> Experiment:
    """The experiment one trial runs: the base experiment with this trial's hardware and coefficients."""
    d = exp.to_dict()
    d["name"] = spec.key
    d["out_dir"] = os.path.join(sweep_dir, TRIALS_DIR)
    d["latency"].update({"profile": spec.hardware, "loss": spec.loss})
    for name in ("lam", "beta", "target_ms"):
        if getattr(spec, name) is not None:
            d["latency"][name] = getattr(spec, name)
    d["dist"]["workers"] = max(exp.sweep.workers_per_trial, 1)
    d["dist"]["storage_path"] = exp.dist.storage_path or os.path.join(os.path.abspath(sweep_dir), "ray")
    return Experiment.from_dict(d, source=f"trial {spec.key}")


def warmup_key(exp: Experiment) -> str:
    """What the shared warm-up depends on: search space, data, seed and the warm-up schedule; not the hardware."""
    d = exp.to_dict()
    relevant = {"space": exp.space.fingerprint(), "data": d["data"],
                "train": {k: v for k, v in d["train"].items() if k not in ("epochs", "arch_lr", "arch_update_every",
                                                                           "arch_steps", "gate_mode")},
                "workers": exp.sweep.workers_per_trial}
    return "warmup-" + hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


# -- persistence ---------------------------------------------------------------------------------------------------


def save_plan(plan: SweepPlan, sweep_dir: str) -> None:
    data = {"trials": [t.to_dict() for t in plan.trials], "warmup_key": plan.warmup_key,
            "warmup_checkpoint": plan.warmup_checkpoint, "parent_run_id": plan.parent_run_id, "stats": plan.stats}
    atomic_write_text(os.path.join(sweep_dir, SWEEP_STATE), json.dumps(data, indent=2) + "\n")


def load_plan(sweep_dir: str) -> SweepPlan:
    path = os.path.join(sweep_dir, SWEEP_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {sweep_dir!r} holds no sweep ({SWEEP_STATE} is missing)")
    with open(path) as fh:
        d = json.load(fh)
    trials = [TrialSpec(t["hardware"], t["loss"], t["lam"], t["beta"], t["target_ms"]) for t in d["trials"]]
    return SweepPlan(trials, d.get("warmup_key"), d.get("warmup_checkpoint"), d.get("parent_run_id"),
                     d.get("stats", {}))
