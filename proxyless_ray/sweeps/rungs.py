"""The rung bookkeeping of the Pareto-aware ASHA scheduler, in its own class (as Ray's ASHA keeps its in
``_Bracket``): the milestones, each group's records per rung, the count of rung stops, and the JSON state file they
are written to on every change and read back from after ``Tuner.restore`` (Tune does not save scheduler state).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from proxyless_ray.fileio import atomic_write_text

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def rung_key(milestone: float) -> str:
    """A rung's key in the records and the state file."""
    return f"{milestone:g}"


class RungBook:
    """Milestones ``grace_period * reduction_factor**k <= max_t`` and ``{group: {rung: {trial_id: record}}}``.

    Args:
        settings: What the records were made under (metrics, ``time_attr``, rungs); a state file made under other
            settings is refused.
        grace_period, max_t, reduction_factor: The milestones.
        state_path: JSON file the records are saved to on every change and read from on first use, or None.
    """

    def __init__(self, settings: Mapping[str, Any], grace_period: float, max_t: float, reduction_factor: float,
                 state_path: str | os.PathLike | None = None):
        self.settings = dict(settings)
        milestones, m = [], float(grace_period)
        while m <= max_t * (1 + 1e-9):
            milestones.append(m)
            m *= reduction_factor
        self.milestones: tuple[float, ...] = tuple(milestones)
        self.state_path = None if state_path is None else os.path.abspath(os.fspath(state_path))
        # group -> rung key -> trial id -> {"acc", "lat", "decision"}
        self.records: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self.num_stopped = 0
        self._loaded = False
        self.ensure_loaded()

    def at(self, group: str, milestone: float) -> dict[str, dict[str, Any]]:
        """The records of ``group`` at ``milestone`` (created empty)."""
        return self.records.setdefault(group, {}).setdefault(rung_key(milestone), {})

    def first(self, group: str) -> dict[str, dict[str, Any]]:
        """The records of ``group`` at the first rung (empty if none yet; not created)."""
        return self.records.get(group, {}).get(rung_key(self.milestones[0]), {})

    def state_dict(self) -> dict[str, Any]:
        """Everything the state file holds: version, settings, rungs, records and the number of rung stops."""
        return {"version": STATE_VERSION, **self.settings, "rungs": [rung_key(m) for m in self.milestones],
                "num_stopped": self.num_stopped, "records": self.records}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "<state>") -> None:
        """Replace the records with ``state`` (from :meth:`state_dict`) after checking it matches these settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{source}: state version {state.get('version')!r}, expected {STATE_VERSION}")
        mismatch = {k: (state.get(k), v) for k, v in self.settings.items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"{source}: scheduler settings differ (file, now): {mismatch}")
        known = {rung_key(m) for m in self.milestones}
        for group, rungs in state["records"].items():
            unknown = set(rungs) - known
            if unknown:
                raise ValueError(f"{source}: group {group!r} has records at rungs {sorted(unknown)}, "
                                 f"not among this scheduler's rungs {sorted(known, key=float)}")
        self.records = copy.deepcopy(dict(state["records"]))
        self.num_stopped = int(state.get("num_stopped", 0))

    def ensure_loaded(self) -> None:
        """Read the state file once (the file, rewritten on every change, is newer than any pickled copy)."""
        if self._loaded:
            return
        self._loaded = True
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as fh:
                self.load_state_dict(json.load(fh), source=self.state_path)
            logger.info("ParetoASHAScheduler: restored rung records from %s", self.state_path)

    def save(self) -> None:
        """Write the state file (when there is one)."""
        if self.state_path:
            os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
            atomic_write_text(self.state_path, json.dumps(self.state_dict(), indent=1, sort_keys=True))

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles the scheduler into tuner.pkl before the sweep runs; an unpickled copy rereads the file.
        state = self.__dict__.copy()
        state["_loaded"] = False
        return state
