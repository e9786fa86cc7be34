"""Everything a search needs to continue exactly where it stopped, and its checkpoint files.

A checkpoint folder holds ``state.pt`` (weights, alphas, both optimizers, counters, RNG states; loaded with
``weights_only=True``) and ``meta.json`` (search-space fingerprint, epoch, metrics history), written through a
temp file and a rename. Learning rates are a pure function of the step counters, so the schedulers' state is the
counters themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from proxyless_ray.config import Experiment
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.nn.network import ProxylessNet, load_tensors
from proxyless_ray.nn.supernet import SuperNet
from proxyless_ray.search.comm import Comm

STATE_FILE = "state.pt"
META_FILE = "meta.json"
DERIVED_DIR = "derived"  # final checkpoint only: the derived network (arch.json + state_dict.pt)


class DamagedCheckpoint(ValueError):
    """A checkpoint's ``state.pt`` or ``meta.json`` cannot be loaded (truncated, foreign, or holding pickles)."""


@dataclass
class SearchState:
    """Supernet, optimizers and counters of a running search."""

    net: SuperNet
    w_opt: torch.optim.SGD
    a_opt: torch.optim.Adam
    epoch: int = 0  # next epoch to run
    step: int = 0  # weight steps done
    arch_step: int = 0  # arch steps done
    baseline: float | None = None  # REINFORCE moving-average reward
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per finished epoch
    alpha_history: list[list[list[float]]] = field(default_factory=list)  # per epoch, per layer, probabilities


def new_state(exp: Experiment, device: torch.device | str = "cpu") -> SearchState:
    """A fresh supernet (seeded) with the paper's optimizers."""
    torch.manual_seed(exp.train.seed)
    net = SuperNet(exp.space, alpha_init_std=exp.train.alpha_init_std,
                   weight_sharing=exp.train.weight_sharing).to(device)
    t = exp.train
    # No weight decay on BN and biases, as the original code does with `no_decay_keys`.
    decay, no_decay = [], []
    for _name, p in net.named_weight_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    w_opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.warmup_lr if t.warmup_epochs else t.lr, momentum=t.momentum, nesterov=t.nesterov,
    )
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=t.arch_lr, betas=tuple(t.arch_betas), eps=t.arch_eps,
                             weight_decay=t.arch_weight_decay)
    return SearchState(net, w_opt, a_opt)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps (per batch, as the paper's code)."""
    if total <= 0:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / total))


def search_lr(t: Any, epoch: int, i: int, warmup_steps: int, steps: int) -> float:
    """The weight learning rate at step ``i`` of ``epoch`` (``t``: the experiment's ``train`` section): one cosine
    over the warm-up epochs from ``warmup_lr``, another over the search epochs from ``lr``."""
    if epoch < t.warmup_epochs:
        return cosine_lr(t.warmup_lr, epoch * warmup_steps + i, t.warmup_epochs * warmup_steps)
    return cosine_lr(t.lr, (epoch - t.warmup_epochs) * steps + i, (t.epochs - t.warmup_epochs) * steps)


def prepare_supernet(state: SearchState, exp: Experiment, device: torch.device, comm: Comm) -> None:
    """Ready a new state's supernet for this worker: SyncBatchNorm if asked, the zero op's gradient setting, the
    memory layout, and rank 0's initial weights on every rank."""
    if exp.train.sync_bn:
        if device.type == "cpu":
            raise ValueError("train.sync_bn needs GPU workers (SyncBatchNorm all-reduces over NCCL); on CPU "
                             "keep the per-worker BatchNorm statistics (train.sync_bn: false)")
        # Safe with path binarization: every rank runs the same sampled path, so the same BN layers sync.
        state.net = nn.SyncBatchNorm.convert_sync_batchnorm(state.net)
    for m in state.net.mixed_ops():
        m.zero_gradient = exp.train.zero_gradient
    if exp.train.channels_last:
        state.net.to(memory_format=torch.channels_last)
    comm.broadcast_([p.data for p in state.net.parameters()])


def save_checkpoint(state: SearchState, folder: str, exp: Experiment) -> str:
    """Write ``state.pt`` and ``meta.json`` into ``folder`` (created); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    payload = {
        "model": state.net.state_dict(),
        "w_opt": state.w_opt.state_dict(),
        "a_opt": state.a_opt.state_dict(),
        "counters": torch.tensor([state.epoch, state.step, state.arch_step], dtype=torch.int64),
        "baseline": torch.tensor([math.nan if state.baseline is None else state.baseline], dtype=torch.float64),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
    }
    tmp = os.path.join(folder, f".{STATE_FILE}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, os.path.join(folder, STATE_FILE))
    meta = {
        "space_fingerprint": exp.space.fingerprint(),
        "weight_sharing": state.net.weight_sharing.value,
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "alpha_history": state.alpha_history,
        "experiment": exp.to_dict(),
    }
    atomic_write_text(os.path.join(folder, META_FILE), json.dumps(meta) + "\n")
    return folder


def read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a search checkpoint: {META_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path!r} is truncated or not JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r} is not a checkpoint's meta.json (got {type(meta).__name__})")
    return meta


STATE_KEYS = ("model", "w_opt", "a_opt", "counters", "baseline", "torch_rng", "python_rng")


def read_checkpoint(folder: str, exp: Experiment) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta.json`` and ``state.pt`` of a checkpoint written for ``exp``, checked (weights-only, nothing unpickled).

    Raises:
        DamagedCheckpoint: a file is missing, truncated, not what a checkpoint holds, or holds pickled objects; the
            one-line message names the file.
        ValueError: the checkpoint is intact but comes from another search space or weight sharing.
    """
    try:
        meta = read_meta(folder)
    except (ValueError, FileNotFoundError) as err:
        raise DamagedCheckpoint(str(err)) from None
    want = exp.space.fingerprint()
    if meta.get("space_fingerprint") != want:
        raise ValueError(
            f"checkpoint {folder!r} was written for search space {meta.get('space_fingerprint')!r}, but this "
            f"experiment's space is {want!r}; refusing to load it (start a new run or use the matching experiment)"
        )
    sharing = meta.get("weight_sharing", "separate")  # checkpoints from before nested weights had separate ones
    if sharing != exp.train.weight_sharing:
        raise ValueError(
            f"checkpoint {folder!r} holds a supernet with {sharing!r} weights, but this experiment's "
            f"train.weight_sharing is {exp.train.weight_sharing!r}; set train.weight_sharing: {sharing} to use it"
        )
    path = os.path.join(folder, STATE_FILE)
    try:
        payload = load_tensors(path)
    except (ValueError, FileNotFoundError) as err:
        raise DamagedCheckpoint(str(err).splitlines()[0]) from None
    missing = [k for k in STATE_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise DamagedCheckpoint(f"{path!r} is not a search checkpoint's state (no {', '.join(missing)})")
    return meta, payload


def newest_intact(folders: list[str], exp: Experiment) -> tuple[str | None, list[str]]:
    """The first checkpoint of ``folders`` (newest first) that reads, and why each one before it is damaged.

    Returns:
        The folder (None when none reads) and one line per damaged folder passed over, each naming its file.

    Raises:
        ValueError: a checkpoint is intact but written for another search space: refused, never passed over.
    """
    damaged = []
    for folder in folders:
        try:
            read_checkpoint(folder, exp)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            continue
        return folder, damaged
    return None, damaged


def say_damaged(reason: str) -> None:
    """One line on stderr for a damaged checkpoint that a resume passes over."""
    print(f"--resume: skipping a damaged checkpoint: {reason}", file=sys.stderr, flush=True)


def no_intact_checkpoint(where: str, damaged: list[str]) -> DamagedCheckpoint:
    """The error of a resume that finds no checkpoint to load: names the newest one's damaged file."""
    return DamagedCheckpoint(f"--resume: no checkpoint under {where!r} loads: {damaged[0]}; start the run again "
                             f"without --resume")


def load_checkpoint(state: SearchState, folder: str, exp: Experiment, weights_only: bool = False) -> SearchState:
    """Restore ``state`` from a checkpoint folder.

    Args:
        state: A fresh state for ``exp`` (its tensors are overwritten in place).
        folder: Checkpoint folder.
        exp: The running experiment; its search space must match the checkpoint's.
        weights_only: Take weights and alphas only and restart counters and optimizers (not used for resume).

    Raises:
        DamagedCheckpoint: a file of the checkpoint cannot be read (see :func:`read_checkpoint`).
        ValueError: the checkpoint comes from a different search space.
    """
    meta, payload = read_checkpoint(folder, exp)
    state.net.load_state_dict(payload["model"])
    if weights_only:
        return state
    state.w_opt.load_state_dict(payload["w_opt"])
    state.a_opt.load_state_dict(payload["a_opt"])
    state.epoch, state.step, state.arch_step = (int(v) for v in payload["counters"])
    b = float(payload["baseline"][0])
    state.baseline = None if math.isnan(b) else b
    torch.set_rng_state(payload["torch_rng"])
    random.setstate((3, tuple(int(v) for v in payload["python_rng"]), None))
    state.history = list(meta.get("history", []))
    state.alpha_history = list(meta.get("alpha_history", []))
    return state


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite: the run stops and writes no result."""


def check_finite_loss(loss_sum: float, epoch: int, exp: Experiment, what: str = "search") -> None:
    """Stop a run whose summed training loss of an epoch is not finite (a sum over all ranks: every rank agrees).

    Raises:
        TrainingDiverged: naming the epoch and the learning rates to lower.
    """
    if not math.isfinite(loss_sum):
        t = exp.train
        raise TrainingDiverged(f"the {what} diverged: training loss is {loss_sum} in epoch {epoch}; stopped without "
                               f"writing an architecture or network; lower train.lr ({t.lr:g}) or train.warmup_lr "
                               f"({t.warmup_lr:g}), or set train.grad_clip")


def save_derived(net: ProxylessNet, folder: str) -> None:
    """The derived network of a finished search: ``arch.json`` and ``state_dict.pt``."""
    os.makedirs(folder, exist_ok=True)
    net.arch.save(os.path.join(folder, "arch.json"))
    tmp = os.path.join(folder, ".state_dict.pt.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, os.path.join(folder, "state_dict.pt"))


def alpha_digest(net) -> str:
    """A short hash of all architecture logits, bit-exact (ranks compare it)."""
    flat = torch.cat([a.detach().reshape(-1).cpu() for a in net.arch_parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
