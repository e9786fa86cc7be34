"""Tune trial schedulers for latency-accuracy sweeps: FIFO, ASHA on a scalar score, and Pareto-aware ASHA.

:class:`ParetoASHAScheduler` is the stopping variant of multi-objective asynchronous successive halving (MO-ASHA):
Schmucker, Donini, Zafar, Salinas, Archambeau, "Multi-objective Asynchronous Successive Halving",
https://arxiv.org/abs/2106.12639 (the design of syne-tune's ``MOASHA``; Ray Tune has no multi-objective scheduler).
It differs from syne-tune in two ways that matter for hardware-aware NAS:

* trials are compared only within their group (by default ``config["hardware"]``): a fast-GPU trial must never stop
  a phone trial, since their latencies are on different scales and their fronts are separate results;
* its rung records can be written to a JSON file on every change and read back, because Tune does not save scheduler
  state: after ``Tuner.restore`` the scheduler comes back from ``tuner.pkl`` as it was before the sweep started.

The ASHA baseline ranks trials on one metric, ``score``, which the trial computes itself, e.g. with
:func:`proxyless_ray.pareto.scalarised_score` (``heldout_acc - w * ln(expected_latency_ms)``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from proxyless_ray.arch import atomic_write_text
from proxyless_ray.pareto import ACC_LAT_SENSES, non_dominated_ranks

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

STATE_VERSION = 1
SCHEDULERS: tuple[str, ...] = ("fifo", "asha", "pareto")
COMPLETE = "COMPLETE"  # marks a rung record made when a trial finished, not a decision
# Settings that must match between a state file and the scheduler reading it (rung keys are checked separately).
_STATE_SETTINGS: tuple[str, ...] = ("time_attr", "acc_metric", "lat_metric", "grace_period", "reduction_factor")


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, else the nested value at the dotted path ``key`` (``"sweep.hardware"``).

    Raises:
        KeyError: The key is in neither form; the message names the key and the top-level keys.
    """
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"config has no {key!r}; its keys are {sorted(map(str, config))}")
        node = node[part]
    return node


def _rung_key(milestone: float) -> str:
    return f"{milestone:g}"


class ParetoASHAScheduler(FIFOScheduler):
    """Multi-objective ASHA (stopping variant) on (accuracy up, latency down), one front per group.

    Rungs lie at ``grace_period * reduction_factor**k <= max_t`` of ``time_attr``. When a result first reaches a
    rung (the highest rung at or below its ``time_attr``), the trial's (accuracy, latency) is recorded at that rung in
    its group, and the trial is ranked among all trials recorded there (itself included) by non-dominated sorting.
    With ``n`` recorded trials, ``keep = ceil(n / reduction_factor)`` and ``better`` the number of recorded trials with
    a strictly lower (better) rank, the trial continues when it is the only one recorded, or is non-dominated
    (rank 0), or ``better < keep``; otherwise it is stopped. The cut falls between ranks, never inside one: among
    the recorded trials, those of equal rank (identical points included) would get the same decision. Decisions are
    never revisited (asynchronous halving without promotions): a trial reporting again at a rung it is already
    recorded at gets its recorded decision back. A trial that finishes between rungs has its final result recorded
    (marked ``COMPLETE``) at the highest rung it reached, so later trials are ranked against it. (syne-tune's MOASHA
    orders trials within a front by an epsilon-net and continues while ``position / n <= 1 / reduction_factor``; this
    rule cuts between whole ranks and needs no tie-break.)

    Args:
        time_attr: Monotone progress counter in each result. Default ``"epoch"``, the trial's own count of finished
            epochs: Tune's ``training_iteration`` restarts at 1 when a Train-V2 trial resumes from a checkpoint.
        acc_metric: Result key of the accuracy to maximise.
        lat_metric: Result key of the latency to minimise.
        group_by: Key of the group in the trial config (a dotted path reaches into nested dicts), or a callable
            ``config -> group``. Group values are compared as strings.
        max_t: Largest ``time_attr`` a trial may reach.
        grace_period: First rung; no trial is stopped before it.
        reduction_factor: About ``1 / reduction_factor`` of the trials recorded at a rung continue.
        stop_last_trials: Stop trials when ``time_attr >= max_t`` (as Ray's ASHA does).
        state_path: JSON file for the rung records, rewritten atomically on every change and read back when the
            scheduler is created or first used after unpickling (``Tuner.restore``). Use one file per sweep, e.g. in
            the experiment folder: an existing file is taken as this sweep's own records.

    Raises:
        ValueError: A setting is out of range, or ``state_path`` holds records from different settings.
    """

    def __init__(self, time_attr: str = "epoch", acc_metric: str = "heldout_acc",
                 lat_metric: str = "expected_latency_ms",
                 group_by: str | Callable[[Mapping[str, Any]], Hashable] = "hardware", max_t: float = 100,
                 grace_period: float = 1, reduction_factor: float = 3, stop_last_trials: bool = True,
                 state_path: str | os.PathLike | None = None):
        super().__init__()
        if grace_period <= 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period}")
        if max_t < grace_period:
            raise ValueError(f"max_t must be >= grace_period ({grace_period}), got {max_t}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if not (isinstance(group_by, str) or callable(group_by)):
            raise ValueError(f"group_by must be a config key or a callable, got {group_by!r}")
        self._time_attr = time_attr
        self._acc_metric = acc_metric
        self._lat_metric = lat_metric
        self._group_by = group_by
        self._max_t = max_t
        self._grace_period = grace_period
        self._rf = reduction_factor
        self._stop_last_trials = stop_last_trials
        self._state_path = None if state_path is None else os.path.abspath(os.fspath(state_path))
        milestones, m = [], float(grace_period)
        while m <= max_t * (1 + 1e-9):
            milestones.append(m)
            m *= reduction_factor
        self._rungs: tuple[float, ...] = tuple(milestones)
        # group -> rung key -> trial id -> {"acc", "lat", "decision"}
        self._records: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self._num_stopped = 0
        self._groups: dict[str, str] = {}  # trial id -> group (a cache; always derivable from the config)
        self._loaded = False
        self._ensure_loaded()

    # ---------------------------------------------------------------- state
    @property
    def rungs(self) -> tuple[float, ...]:
        """Rung milestones in ``time_attr`` units, ascending."""
        return self._rungs

    @property
    def state_path(self) -> str | None:
        """Absolute path of the JSON state file, or None."""
        return self._state_path

    def records(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """A copy of ``{group: {rung: {trial_id: {"acc", "lat", "decision"}}}}``.

        Rungs are keyed ``f"{milestone:g}"``; a decision is ``"CONTINUE"``, ``"STOP"`` or ``"COMPLETE"``.
        """
        self._ensure_loaded()
        return copy.deepcopy(self._records)

    def _settings(self) -> dict[str, Any]:
        return {"time_attr": self._time_attr, "acc_metric": self._acc_metric, "lat_metric": self._lat_metric,
                "grace_period": self._grace_period, "reduction_factor": self._rf}

    def state_dict(self) -> dict[str, Any]:
        """Everything the state file holds: version, settings, rungs, records and the number of rung stops."""
        return {"version": STATE_VERSION, **self._settings(), "rungs": [_rung_key(m) for m in self._rungs],
                "num_stopped": self._num_stopped, "records": self._records}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "<state>") -> None:
        """Replace the records with ``state`` (from :meth:`state_dict`) after checking it matches these settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{source}: state version {state.get('version')!r}, expected {STATE_VERSION}")
        mismatch = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(f"{source}: scheduler settings differ (file, now): {mismatch}")
        known = {_rung_key(m) for m in self._rungs}
        for group, rungs in state["records"].items():
            unknown = set(rungs) - known
            if unknown:
                raise ValueError(f"{source}: group {group!r} has records at rungs {sorted(unknown)}, "
                                 f"not among this scheduler's rungs {sorted(known, key=float)}")
        self._records = copy.deepcopy(dict(state["records"]))
        self._num_stopped = int(state.get("num_stopped", 0))

    def _ensure_loaded(self) -> None:
        # The file, rewritten on every change, is newer than any pickled copy of this object (see __getstate__).
        if self._loaded:
            return
        self._loaded = True
        if self._state_path and os.path.exists(self._state_path):
            with open(self._state_path) as fh:
                self.load_state_dict(json.load(fh), source=self._state_path)
            logger.info("ParetoASHAScheduler: restored rung records from %s", self._state_path)

    def _save(self) -> None:
        if self._state_path:
            os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
            atomic_write_text(self._state_path, json.dumps(self.state_dict(), indent=1, sort_keys=True))

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles the scheduler into tuner.pkl before the sweep runs; an unpickled copy rereads the file.
        state = self.__dict__.copy()
        state["_loaded"] = False
        return state

    # ---------------------------------------------------------------- decisions
    def _group_of(self, trial: Trial) -> str:
        group = self._groups.get(trial.trial_id)
        if group is None:
            if callable(self._group_by):
                group = str(self._group_by(trial.config))
            else:
                try:
                    group = str(config_value(trial.config, self._group_by))
                except KeyError as err:
                    raise ValueError(f"trial {trial.trial_id}: cannot group by {self._group_by!r}: {err}") from None
            self._groups[trial.trial_id] = group
        return group

    def _decide(self, recorded: Mapping[str, Mapping[str, Any]], trial_id: str) -> str:
        n = len(recorded)
        if n == 1:
            return TrialScheduler.CONTINUE
        ids = list(recorded)
        ranks = non_dominated_ranks([[recorded[i]["acc"], recorded[i]["lat"]] for i in ids], ACC_LAT_SENSES)
        rank = ranks[ids.index(trial_id)]
        better = int((ranks < rank).sum())
        keep = math.ceil(n / self._rf)
        return TrialScheduler.CONTINUE if rank == 0 or better < keep else TrialScheduler.STOP

    def _on_rung(self, trial: Trial, result: Mapping[str, Any], decide: bool = True) -> str | None:
        """Record ``result`` at the highest rung it reached and decide; None when it reached no rung.

        With ``decide=False`` (a finished trial) the record is marked ``COMPLETE`` instead of a decision.
        """
        t = result.get(self._time_attr)
        if t is None:
            return None
        reached = [m for m in self._rungs if t >= m]
        if not reached:
            return None
        acc, lat = result.get(self._acc_metric), result.get(self._lat_metric)
        if acc is None or lat is None:
            logger.debug("trial %s reached rung %s without %r/%r", trial.trial_id, reached[-1], self._acc_metric,
                         self._lat_metric)
            return None
        rung = _rung_key(reached[-1])
        recorded = self._records.setdefault(self._group_of(trial), {}).setdefault(rung, {})
        if trial.trial_id in recorded:
            return recorded[trial.trial_id]["decision"]
        recorded[trial.trial_id] = {"acc": float(acc), "lat": float(lat)}
        decision = self._decide(recorded, trial.trial_id) if decide else COMPLETE
        recorded[trial.trial_id]["decision"] = decision
        if decision == TrialScheduler.STOP:
            self._num_stopped += 1
        self._save()
        return decision

    # ---------------------------------------------------------------- Tune hooks
    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        """Resolve the trial's group now, so that a config without the group key fails before any training."""
        self._ensure_loaded()
        self._group_of(trial)

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        """CONTINUE or STOP; see the class docstring."""
        self._ensure_loaded()
        t = result.get(self._time_attr)
        if t is not None and t >= self._max_t and self._stop_last_trials:
            return TrialScheduler.STOP
        return self._on_rung(trial, result) or TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict | None) -> None:
        """Record the final result at its rung, if not yet recorded, so later trials are ranked against it."""
        self._ensure_loaded()
        if result:
            self._on_rung(trial, result, decide=False)

    def debug_string(self) -> str:
        """One line per group: trials recorded and stopped at each rung."""
        self._ensure_loaded()
        lines = [f"Using ParetoASHA: time_attr={self._time_attr} rungs={[_rung_key(m) for m in self._rungs]} "
                 f"reduction_factor={self._rf} num_stopped={self._num_stopped}"]
        for group, rungs in sorted(self._records.items()):
            parts = []
            for rung in sorted(rungs, key=float):
                stops = sum(rec["decision"] == TrialScheduler.STOP for rec in rungs[rung].values())
                parts.append(f"{self._time_attr} {rung}: {len(rungs[rung])} recorded, {stops} stopped")
            lines.append(f"  {group}: " + " | ".join(parts))
        return "\n".join(lines)


def asha_scalarised(metric: str = "score", mode: str = "max", time_attr: str = "epoch", max_t: float = 100,
                    grace_period: float = 1, reduction_factor: float = 3, **kwargs: Any) -> AsyncHyperBandScheduler:
    """Ray's ASHA on one scalar metric, the single-objective baseline.

    Args:
        metric: Result key of the scalar, by default ``score`` as computed in the trial by
            :func:`proxyless_ray.pareto.scalarised_score`.
        mode: ``"max"`` or ``"min"``.
        time_attr: Monotone progress counter (see :class:`ParetoASHAScheduler`).
        max_t: Largest ``time_attr`` a trial may reach.
        grace_period: First rung.
        reduction_factor: Halving rate.
        **kwargs: Passed on to ``AsyncHyperBandScheduler`` (``brackets``, ``stop_last_trials``).

    Returns:
        An ``AsyncHyperBandScheduler`` (``ASHAScheduler``).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if grace_period <= 0 or max_t < grace_period or reduction_factor <= 1:
        raise ValueError(f"need 0 < grace_period <= max_t and reduction_factor > 1, got grace_period={grace_period}, "
                         f"max_t={max_t}, reduction_factor={reduction_factor}")
    return AsyncHyperBandScheduler(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t,
                                   grace_period=grace_period, reduction_factor=reduction_factor, **kwargs)


def build_scheduler(name: str, **kwargs: Any) -> TrialScheduler:
    """Build a scheduler by name: ``fifo``, ``asha`` (:func:`asha_scalarised`) or ``pareto`` (Pareto ASHA).

    Args:
        name: One of :data:`SCHEDULERS`.
        **kwargs: Passed to the scheduler; ``fifo`` takes none.

    Raises:
        ValueError: Unknown name, or arguments given to ``fifo``.
    """
    if name == "fifo":
        if kwargs:
            raise ValueError(f"the fifo scheduler takes no arguments, got {sorted(kwargs)}")
        return FIFOScheduler()
    if name == "asha":
        return asha_scalarised(**kwargs)
    if name == "pareto":
        return ParetoASHAScheduler(**kwargs)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {list(SCHEDULERS)}")
