"""Where a resumed Ray Train search starts: the newest intact checkpoint of its run folder.

Ray Train V2 resumes a run (same storage path and name) from the latest checkpoint its run snapshot records
(``checkpoint_manager_snapshot.json`` in the run folder), whatever state that checkpoint's files are in: a truncated
``state.pt`` would fail every worker, and every retry, the same way. So the driver reads the checkpoints first,
newest first. When the newest one is intact and the snapshot is there, Ray's own restore is right. Otherwise the
damaged ones are set aside (renamed ``damaged_checkpoint_*``, kept for a look), the snapshot is removed and a new
Ray run starts whose workers restore the newest intact checkpoint (``init_checkpoint``).

Imports only the standard library and :mod:`proxyless_ray.search.state`; the snapshot's file name is Ray's.
"""

from __future__ import annotations

import json
import os
import sys

from proxyless_ray.config import Experiment
from proxyless_ray.distributed.ray_private import RAY_SNAPSHOT
from proxyless_ray.search.state import newest_intact, no_intact_checkpoint, say_damaged

CHECKPOINT_PREFIX = "checkpoint_"
DAMAGED_PREFIX = "damaged_"


def ray_checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoint_<timestamp>`` folders of a local Ray Train run, newest first (the names sort by time)."""
    if not os.path.isdir(run_dir):
        return []
    found = sorted((d for d in os.listdir(run_dir)
                    if d.startswith(CHECKPOINT_PREFIX) and os.path.isdir(os.path.join(run_dir, d))), reverse=True)
    return [os.path.join(run_dir, d) for d in found]


def latest_ray_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_<timestamp>`` folder of a local Ray Train run, or None."""
    found = ray_checkpoints(run_dir)
    return found[0] if found else None


def resume_point(run_dir: str, exp: Experiment) -> str | None:
    """Prepare a local run folder for ``--resume``; returns the checkpoint a new Ray run must restore, or None.

    None means Ray's own restore is right (the newest checkpoint is intact and the snapshot names it) or there is
    no checkpoint at all (the run starts from scratch; the caller says so).

    Raises:
        DamagedCheckpoint: no checkpoint loads; names the newest one's damaged file. Nothing is renamed then.
        ValueError: a checkpoint written for another search space.
    """
    found = ray_checkpoints(run_dir)
    if not found:
        return None
    intact, damaged = newest_intact(found, exp)
    if intact is None:
        raise no_intact_checkpoint(run_dir, damaged)
    for reason in damaged:
        say_damaged(reason)
    snapshot = os.path.join(run_dir, RAY_SNAPSHOT)
    if not damaged and _readable(snapshot):
        return None
    if os.path.exists(snapshot) and not damaged:
        print(f"--resume: Ray's run snapshot {snapshot} is damaged; restarting the Ray run from {intact}",
              file=sys.stderr, flush=True)
    for folder in found[:found.index(intact)]:
        os.replace(folder, os.path.join(run_dir, DAMAGED_PREFIX + os.path.basename(folder)))
    if os.path.exists(snapshot):
        os.unlink(snapshot)  # Ray would look for the checkpoints just set aside, or resume from a damaged one
    return intact


def _readable(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return isinstance(json.load(fh), dict)
    except (OSError, ValueError):
        return False
