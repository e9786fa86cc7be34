"""Search drivers: in-process (``dist.workers == 0``) or a Ray Train ``TorchTrainer`` of N workers.

Both run the same per-worker loop (:class:`proxyless_ray.search.loop.SearchLoop`) and end with the same outputs
(:func:`proxyless_ray.search.results.write_search_outputs`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from proxyless_ray.config import Experiment
from proxyless_ray.fileio import umask_mode
from proxyless_ray.latency.profile import shipped_models
from proxyless_ray.latency.target import target_of
from proxyless_ray.progress import format_epoch
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.search.results import check_writable, interrupted, write_search_outputs
from proxyless_ray.search.state import DamagedCheckpoint, no_intact_checkpoint, say_damaged
from proxyless_ray.tracking.search import SearchTracking

CHECKPOINTS_DIR = "checkpoints"


class LocalReporter:
    """Keeps the last checkpoints under ``<out>/checkpoints/epoch-XXXX`` and prints one line per epoch."""

    def __init__(self, out_dir: str, keep: int = 2, echo: bool = True):
        self.folder = os.path.join(out_dir, CHECKPOINTS_DIR)
        self.keep, self.echo = max(keep, 1), echo
        self.latest: str | None = latest_checkpoint(out_dir)

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if self.echo:
            print(format_epoch(metrics), file=sys.stderr, flush=True)
        if checkpoint_dir is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        dest = os.path.join(self.folder, f"epoch-{metrics['epoch']:04d}")
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        os.chmod(tmp, umask_mode(folder=True))  # the loop's checkpoint comes from mkdtemp (0700)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        self.latest = dest
        old = sorted(d for d in os.listdir(self.folder) if d.startswith("epoch-") and not d.endswith(".tmp"))
        for d in old[:-self.keep]:
            shutil.rmtree(os.path.join(self.folder, d), ignore_errors=True)


def latest_checkpoint(out_dir: str) -> str | None:
    folder = os.path.join(out_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return None
    done = sorted(d for d in os.listdir(folder) if d.startswith("epoch-") and not d.endswith(".tmp"))
    return os.path.join(folder, done[-1]) if done else None


def restore_newest_intact(loop: SearchLoop, out_dir: str) -> str:
    """Restore ``loop`` from the newest checkpoint that loads, one line on stderr for each damaged one passed over.

    Raises:
        DamagedCheckpoint: no checkpoint loads; names the newest one's damaged file.
        ValueError: a checkpoint of another search space (refused, not passed over).
    """
    folder = os.path.join(out_dir, CHECKPOINTS_DIR)
    found = sorted((d for d in os.listdir(folder) if d.startswith("epoch-") and not d.endswith(".tmp")),
                   reverse=True)
    damaged: list[str] = []
    for name in found:
        path = os.path.join(folder, name)
        try:
            loop.restore(path)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            say_damaged(str(err))
            continue
        return path
    raise no_intact_checkpoint(folder, damaged)


def run_local(exp: Experiment, resume: bool = False, echo: bool = True) -> dict[str, Any]:
    """Run the whole search in this process and write the outputs; returns ``result.json``'s content."""
    out = exp.output_dir
    check_writable(out)
    tracking = SearchTracking(exp, resume)  # MLflow: fails fast on an unreachable store, before any training
    tracking.check()
    target = target_of(exp)  # resolved once; the loop, the outputs and the MLflow tags all take this one
    target.check_machine()  # a profile measured on another machine: one line (or refused)
    others = shipped_models()
    reporter = LocalReporter(out, exp.dist.checkpoints_to_keep, echo)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        reporter(metrics, checkpoint_dir)
        tracking.log_epoch(metrics)

    loop = SearchLoop(exp, Comm(), report, latency_model=target.model, other_models=others)
    if resume and reporter.latest is None:
        print(f"--resume: no checkpoint under {os.path.join(out, CHECKPOINTS_DIR)!r} (the run stopped before its "
              f"first one); starting from scratch", file=sys.stderr)
    elif resume:
        reporter.latest = restore_newest_intact(loop, out)
        print(f"resuming from {reporter.latest} (epoch {loop.state.epoch})", file=sys.stderr)
    elif reporter.latest is not None:
        shutil.rmtree(os.path.join(out, CHECKPOINTS_DIR))  # a fresh run does not mix with an old one
        reporter.latest = None
    with tracking.active(target):  # MLflow parent + child runs; marked FAILED if anything below raises
        try:
            loop.run()
        except KeyboardInterrupt:
            raise interrupted(out, reporter.latest) from None
        if reporter.latest is None:
            raise RuntimeError("the search finished without a final checkpoint")
        result = write_search_outputs(exp, reporter.latest, out, target.model, others)
        tracking.finish(out, result)
    print(json.dumps({k: result[k] for k in ("arch", "latency_ms", "test_acc", "profile")}), flush=True)
    return result


def run_search(exp: Experiment, resume: bool = False) -> dict[str, Any]:
    """Run a search the way its experiment asks (in-process for ``dist.workers == 0``, else Ray Train)."""
    if exp.dist.workers == 0:
        return run_local(exp, resume=resume)
    # deferred on purpose: Ray loads for a Ray search only (an in-process search never imports it)
    from proxyless_ray.distributed.ray_trainer import run_ray_search

    return run_ray_search(exp, resume=resume)
