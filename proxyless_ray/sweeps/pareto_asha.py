"""Pareto-aware asynchronous successive halving, a Ray Tune ``TrialScheduler`` for latency-accuracy sweeps.

:class:`ParetoASHAScheduler` is the stopping variant of multi-objective asynchronous successive halving (MO-ASHA):
Schmucker, Donini, Zafar, Salinas, Archambeau, "Multi-objective Asynchronous Successive Halving",
https://arxiv.org/abs/2106.12639 (the design of syne-tune's ``MOASHA``; Ray Tune has no multi-objective scheduler).
It differs from syne-tune in three ways that matter for hardware-aware NAS:

* trials are compared only within their group (by default ``config["hardware"]``): a fast-GPU trial must never stop
  a phone trial, since their latencies are on different scales and their fronts are separate results;
* its rung records can be written to a JSON file on every change and read back, because Tune does not save scheduler
  state: after ``Tuner.restore`` the scheduler comes back from ``tuner.pkl`` as it was before the sweep started;
* its first rung can be synchronous (``group_sizes``): asynchronous halving lets the first trials of a group pass
  their first rung with almost nobody to be compared with, which wastes most of the saving when a sweep has few
  trials per hardware and few concurrent slots (measured: ``docs/benchmarks.md``, Pareto scheduler).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from proxyless_ray.pareto import ACC_LAT_SENSES, non_dominated_ranks
from proxyless_ray.sweeps.rungs import RungBook, rung_key

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # marks a rung record made when a trial finished, not a decision
WAIT = "WAIT"  # marks a record at a synchronous first rung, waiting for the rest of its group


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

    Synchronous first rung (``group_sizes`` given): a trial reaching the first rung is recorded ``WAIT`` and PAUSED
    until every trial of its group is recorded there or has ended; then the whole group is decided at once by the
    rule above (so ``n`` is the group's size), paused trials that continue are resumed (after every PENDING trial
    has been started) and the others are stopped. Later rungs stay asynchronous. Tune's ``max_concurrent_trials``
    counts paused trials as running, so cap concurrency with a resource each running trial holds instead (the sweep
    uses its ``driver_slot``), or every slot can end up held by a paused trial. A paused trial resumes from its own
    checkpoint (a Train-V2 trial restores its run by name). If nothing is running or pending while a group still
    waits (a trial that can never be placed), the group is decided with what is recorded.

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
        group_sizes: Number of trials in each group (group values as strings); makes the first rung synchronous.
            None: every rung is asynchronous.

    Raises:
        ValueError: A setting is out of range, or ``state_path`` holds records from different settings.
    """

    def __init__(self, time_attr: str = "epoch", acc_metric: str = "heldout_acc",
                 lat_metric: str = "expected_latency_ms",
                 group_by: str | Callable[[Mapping[str, Any]], Hashable] = "hardware", max_t: float = 100,
                 grace_period: float = 1, reduction_factor: float = 3, stop_last_trials: bool = True,
                 state_path: str | os.PathLike | None = None, group_sizes: Mapping[Any, int] | None = None):
        super().__init__()
        if grace_period <= 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period}")
        if max_t < grace_period:
            raise ValueError(f"max_t must be >= grace_period ({grace_period}), got {max_t}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if not (isinstance(group_by, str) or callable(group_by)):
            raise ValueError(f"group_by must be a config key or a callable, got {group_by!r}")
        sizes = {str(g): n for g, n in (group_sizes or {}).items()}
        bad = {g: n for g, n in sizes.items() if not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"group_sizes must be whole numbers >= 1, got {bad}")
        self._time_attr = time_attr
        self._acc_metric = acc_metric
        self._lat_metric = lat_metric
        self._group_by = group_by
        self._max_t = max_t
        self._grace_period = grace_period
        self._rf = reduction_factor
        self._stop_last_trials = stop_last_trials
        self._group_sizes: dict[str, int] | None = sizes or None
        self._groups: dict[str, str] = {}  # trial id -> group (a cache; always derivable from the config)
        self._book = RungBook({"time_attr": time_attr, "acc_metric": acc_metric, "lat_metric": lat_metric,
                               "grace_period": grace_period, "reduction_factor": reduction_factor},
                              grace_period, max_t, reduction_factor, state_path)

    # ---------------------------------------------------------------- state
    @property
    def rungs(self) -> tuple[float, ...]:
        """Rung milestones in ``time_attr`` units, ascending."""
        return self._book.milestones

    @property
    def synchronous_first_rung(self) -> bool:
        """Whether the first rung waits for the whole group (``group_sizes`` was given)."""
        return self._group_sizes is not None

    @property
    def state_path(self) -> str | None:
        """Absolute path of the JSON state file, or None."""
        return self._book.state_path

    def records(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """A copy of ``{group: {rung: {trial_id: {"acc", "lat", "decision"}}}}``.

        Rungs are keyed ``f"{milestone:g}"``; a decision is ``"CONTINUE"``, ``"STOP"``, ``"COMPLETE"`` or, at a
        synchronous first rung, ``"WAIT"``.
        """
        self._ensure_loaded()
        return copy.deepcopy(self._book.records)

    def state_dict(self) -> dict[str, Any]:
        """Everything the state file holds: version, settings, rungs, records and the number of rung stops."""
        return self._book.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], source: str = "<state>") -> None:
        """Replace the records with ``state`` (from :meth:`state_dict`) after checking it matches these settings."""
        self._book.load_state_dict(state, source)

    def _ensure_loaded(self) -> None:
        self._book.ensure_loaded()

    def _save(self) -> None:
        self._book.save()

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

    def _on_rung(self, tune_controller: TuneController | None, trial: Trial, result: Mapping[str, Any],
                 decide: bool = True) -> str | None:
        """Record ``result`` at the highest rung it reached and decide; None when it reached no rung.

        With ``decide=False`` (a finished trial) the record is marked ``COMPLETE`` instead of a decision. At a
        synchronous first rung the trial waits (``PAUSE``) unless its record completes its group.
        """
        t = result.get(self._time_attr)
        if t is None:
            return None
        reached = [m for m in self._book.milestones if t >= m]
        if not reached:
            return None
        acc, lat = result.get(self._acc_metric), result.get(self._lat_metric)
        if acc is None or lat is None:
            logger.debug("trial %s reached rung %s without %r/%r", trial.trial_id, reached[-1], self._acc_metric,
                         self._lat_metric)
            return None
        group = self._group_of(trial)
        recorded = self._book.at(group, reached[-1])
        if trial.trial_id in recorded:
            return recorded[trial.trial_id]["decision"]
        recorded[trial.trial_id] = {"acc": float(acc), "lat": float(lat)}
        if decide and self._group_sizes is not None and reached[-1] == self._book.milestones[0]:
            recorded[trial.trial_id]["decision"] = WAIT
            self._save()
            return self._settle(tune_controller, group, trial) or TrialScheduler.PAUSE
        decision = self._decide(recorded, trial.trial_id) if decide else COMPLETE
        recorded[trial.trial_id]["decision"] = decision
        if decision == TrialScheduler.STOP:
            self._book.num_stopped += 1
        self._save()
        return decision

    # ---------------------------------------------------------------- the synchronous first rung
    def _first_rung(self, group: str) -> dict[str, dict[str, Any]]:
        """The records of ``group`` at the first rung (empty if none yet)."""
        return self._book.first(group)

    def _first_rung_decision(self, trial: Trial) -> str | None:
        if self._group_sizes is None:
            return None
        return self._first_rung(self._group_of(trial)).get(trial.trial_id, {}).get("decision")

    def _group_complete(self, tune_controller: TuneController | None, group: str) -> bool:
        """Every trial of ``group`` is recorded at the first rung or has ended without reaching it."""
        if tune_controller is None:
            return False
        recorded = self._first_rung(group)
        members = [t for t in tune_controller.get_trials() if self._group_of(t) == group]
        if len(members) < self._group_sizes.get(group, 0):
            return False  # not all of the group's trials exist yet
        return all(t.trial_id in recorded or t.status in (Trial.TERMINATED, Trial.ERROR) for t in members)

    def _settle(self, tune_controller: TuneController | None, group: str, current: Trial | None = None,
                force: bool = False) -> str | None:
        """Decide ``group``'s waiting first-rung records once the group is complete (or with ``force``).

        Paused or pending trials told to stop are stopped here; those told to continue are resumed by
        :meth:`choose_trial_to_run`. Returns ``current``'s decision, or None while the group still waits.
        """
        recorded = self._first_rung(group)
        waiting = [i for i, rec in recorded.items() if rec.get("decision") == WAIT]
        if not waiting or not (force or self._group_complete(tune_controller, group)):
            return None
        decisions = {i: self._decide(recorded, i) for i in waiting}  # all against the same, whole rung
        for i, decision in decisions.items():
            recorded[i]["decision"] = decision
        stops = sum(d == TrialScheduler.STOP for d in decisions.values())
        self._book.num_stopped += stops
        self._save()
        logger.info("ParetoASHAScheduler: first rung of %r decided: %d continue, %d stop", group,
                    len(decisions) - stops, stops)
        if tune_controller is not None:
            for t in tune_controller.get_trials():
                if (t is not current and decisions.get(t.trial_id) == TrialScheduler.STOP
                        and (t.status in (Trial.PAUSED, Trial.PENDING) or getattr(t, "is_saving", False))):
                    tune_controller.stop_trial(t)
        return decisions.get(current.trial_id) if current is not None else None

    # ---------------------------------------------------------------- Tune hooks
    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        """Resolve the trial's group now, so that a config without the group key fails before any training."""
        self._ensure_loaded()
        group = self._group_of(trial)
        if self._group_sizes is not None and group not in self._group_sizes:
            raise ValueError(f"trial {trial.trial_id}: group {group!r} is not in group_sizes "
                             f"{sorted(self._group_sizes)}")

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        """CONTINUE, PAUSE (waiting at a synchronous first rung) or STOP; see the class docstring."""
        self._ensure_loaded()
        first = self._first_rung_decision(trial)
        if first == WAIT:  # reports again before its group was decided (restarted after a restore): wait again
            return self._settle(tune_controller, self._group_of(trial), trial) or TrialScheduler.PAUSE
        if first == TrialScheduler.STOP:
            return TrialScheduler.STOP
        t = result.get(self._time_attr)
        if t is not None and t >= self._max_t and self._stop_last_trials:
            return TrialScheduler.STOP
        return self._on_rung(tune_controller, trial, result) or TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict | None) -> None:
        """Record the final result at its rung, if not yet recorded, so later trials are ranked against it."""
        self._ensure_loaded()
        if result:
            self._on_rung(tune_controller, trial, result, decide=False)
        self._settle_after_end(tune_controller, trial)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        """A trial that failed before the first rung no longer holds its group back."""
        self._ensure_loaded()
        self._settle_after_end(tune_controller, trial)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        """A paused or pending trial that was stopped no longer holds its group back."""
        self._ensure_loaded()
        self._settle_after_end(tune_controller, trial)

    def _settle_after_end(self, tune_controller: TuneController | None, trial: Trial) -> None:
        if self._group_sizes is not None:
            self._settle(tune_controller, self._group_of(trial))

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        """PENDING trials first (every trial reaches the first rung before any is resumed), then paused trials
        whose first rung said continue; a trial still waiting for its group is never chosen."""
        self._ensure_loaded()
        trials = tune_controller.get_trials()

        def first_runnable(status: str) -> Trial | None:
            return next((t for t in trials if t.status == status
                         and self._first_rung_decision(t) not in (WAIT, TrialScheduler.STOP)), None)

        chosen = first_runnable(Trial.PENDING) or first_runnable(Trial.PAUSED)
        if chosen or self._group_sizes is None or any(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials):
            return chosen
        # Nothing runs or waits to run, yet a group waits at the first rung: decide with what is recorded.
        for group in sorted(self._book.records):
            self._settle(tune_controller, group, force=True)
        return first_runnable(Trial.PAUSED)

    def debug_string(self) -> str:
        """One line per group: trials recorded and stopped at each rung."""
        self._ensure_loaded()
        lines = [f"Using ParetoASHA: time_attr={self._time_attr} rungs={[rung_key(m) for m in self._book.milestones]} "
                 f"reduction_factor={self._rf} num_stopped={self._book.num_stopped}"]
        for group, rungs in sorted(self._book.records.items()):
            parts = []
            for rung in sorted(rungs, key=float):
                stops = sum(rec["decision"] == TrialScheduler.STOP for rec in rungs[rung].values())
                parts.append(f"{self._time_attr} {rung}: {len(rungs[rung])} recorded, {stops} stopped")
            lines.append(f"  {group}: " + " | ".join(parts))
        return "\n".join(lines)
