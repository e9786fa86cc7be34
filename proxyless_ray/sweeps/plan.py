"""The sweep's plan: the grid of trials (hardware profiles x latency coefficients), each trial's experiment, the
shared warm-up's key, the plan saved beside the sweep (``sweep.json``) so ``--resume`` runs the same trials, how
many trials run at once on a cluster's resources, and the check that a sweep folder may be restored at all (Tune
unpickles it).

Pure configuration: no Ray. :mod:`proxyless_ray.sweeps.sweep` runs the plan on Ray Tune.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import stat
from dataclasses import dataclass, field
from typing import Any

from proxyless_ray.config import Experiment
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.latency.model import load_latency_model_for

SWEEP_STATE = "sweep.json"
TRIALS_DIR = "trials"
DRIVER_SLOT = "driver_slot"  # custom resource the Tune trials (Train drivers) hold instead of CPUs
# A trial's network/ holds arch.json and state_dict.pt, without the torch.export program: tracing it is a large share
# of a short trial, paid by every trial, while few trials' networks are used as they are. What reads a trial's
# network rebuilds it from those two files (retraining and the demo's fine-tune, which export their own program), and
# registering a front network traces the program into the registered model.
TRIAL_PROGRAM = False


@dataclass(frozen=True)
class TrialSpec:
    """One point of the sweep grid."""

    hardware: str
    loss: str
    lam: float | None = None
    beta: float | None = None
    target_ms: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        """The spec from its plain-dict form (:meth:`to_dict`, as in ``sweep.json`` and Tune configs; ``lam``: the
        coefficient's key in sweeps saved by earlier releases)."""
        return cls(d["hardware"], d["loss"], d.get("lambda", d.get("lam")), d.get("beta"), d.get("target_ms"))

    @property
    def key(self) -> str:
        """Stable, filesystem-safe trial name, e.g. ``pixel1-add-lam0.1``. It names the trial's folder, its Tune
        trial and its MLflow run (``trial_key``), which a resumed sweep finds again by it, so it keeps its
        ``lam`` although the coefficient is called ``lambda`` everywhere else."""
        parts = [self.hardware, self.loss]
        for name in ("lam", "beta", "target_ms"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name.replace('_ms', '')}{v:g}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "loss": self.loss, "lambda": self.lam, "beta": self.beta,
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
    for name, key in (("lam", "lambda"), ("beta", "beta"), ("target_ms", "target_ms")):
        if getattr(spec, name) is not None:
            d["latency"][key] = getattr(spec, name)
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
    trials = [TrialSpec.from_dict(t) for t in d["trials"]]
    return SweepPlan(trials, d.get("warmup_key"), d.get("warmup_checkpoint"), d.get("parent_run_id"),
                     d.get("stats", {}))


def in_actor(exp: Experiment) -> bool:
    """Whether the sweep's trials run their search in their Tune actor (one worker each), not on Ray Train."""
    return exp.sweep.workers_per_trial <= 1


def trial_resources(exp: Experiment, cluster: dict[str, float]) -> tuple[dict[str, float], int | None]:
    """A Tune trial's resources, and ``max_concurrent_trials`` (None when the resources cap concurrency).

    A trial of one worker computes in its own actor (:mod:`proxyless_ray.sweeps.trial`), so it holds what that worker
    would: ``dist.cpus_per_worker`` CPUs, its GPUs and custom resources. A trial of several workers only drives its
    TorchTrainer; giving it a CPU would deadlock a 2-core laptop (facts P2). When the cluster has a ``driver_slot``
    resource (the embedded one always does), each trial also holds ``1/n`` of it, so at most ``n`` trials run at
    once; paused trials hold none, which a synchronous first rung needs (Tune's ``max_concurrent_trials`` counts
    paused trials as running). Otherwise ``max_concurrent_trials`` caps them, and a Train driver takes a sliver of
    a CPU.

    Args:
        exp: The sweep's experiment.
        cluster: The cluster's total resources (``ray.cluster_resources()``).
    """
    n = max_concurrent(exp, cluster)
    d = exp.dist
    own = ({"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker > 0 else {}),
            **d.resources_per_worker} if in_actor(exp) else {})
    slots = cluster.get(DRIVER_SLOT, 0.0)
    if slots >= n:
        return {DRIVER_SLOT: math.floor(slots / n * 1e4) / 1e4, **own}, None  # Ray keeps 4 decimals of a resource
    return own or {"CPU": 0.01}, n


def fallback_note(exp: Experiment, cluster: dict[str, float]) -> str | None:
    """What a sweep on a cluster without enough ``driver_slot`` does instead (None when it has them)."""
    _, max_trials = trial_resources(exp, cluster)
    if max_trials is None:
        return None
    sync_rung = exp.sweep.scheduler == "pareto" and exp.sweep.synchronous_first_rung
    share = f"{exp.dist.cpus_per_worker:g} CPU" if in_actor(exp) else "0.01 CPU"
    return (f"the cluster has no {DRIVER_SLOT!r} resource, falling back: each trial takes {share}, at most "
            f"{max_trials} run at once{', the Pareto first rung is asynchronous' * sync_rung} (give the head one: "
            f"ray start --head --resources '{{\"{DRIVER_SLOT}\": 64}}')")


def max_concurrent(exp: Experiment, cluster: dict[str, float]) -> int:
    """Trials that fit at once: ``sweep.max_concurrent_trials``, else the cluster's CPUs (or GPUs) divided by what
    one trial's workers need."""
    if exp.sweep.max_concurrent_trials:
        return exp.sweep.max_concurrent_trials
    w = max(exp.sweep.workers_per_trial, 1)
    if exp.dist.gpus_per_worker > 0:
        return max(int(cluster.get("GPU", 0) // (w * exp.dist.gpus_per_worker)), 1)
    return max(int(cluster.get("CPU", 1) // (w * exp.dist.cpus_per_worker)), 1)


def check_trusted(tune_path: str) -> None:
    """Refuse to restore a Tune folder that someone else could have written.

    ``Tuner.restore`` unpickles ``tuner.pkl`` and the trials' state from it, and unpickling runs code: the folder is
    trusted like code. Every file and folder in it (and the folder above) must belong to this user (or root) and be
    writable by nobody else.

    Raises:
        PermissionError: naming the first path that fails the check and what to do.
    """
    uid = os.getuid()
    paths = [os.path.dirname(tune_path), tune_path]
    for root, dirs, files in os.walk(tune_path):
        paths += [os.path.join(root, name) for name in dirs + files]
    for path in paths:
        st = os.lstat(path)
        if st.st_uid not in (uid, 0) or st.st_mode & 0o022:
            raise PermissionError(
                f"--resume: {path!r} is owned by uid {st.st_uid} or writable by others (mode "
                f"{stat.filemode(st.st_mode)}); Tune restores a sweep by unpickling its files, which runs code, so "
                f"only a folder that this user alone can write is resumed (chmod go-w, or start the sweep again)")
