"""Trials across workers: the budget, who runs a trial, dead trials, heartbeats, the best per group.

A worker records itself on each trial it runs (user attribute ``worker``: host, pid, the
process's start time and the trial's number), so that any worker on the same host can tell a
dead trial at once; elsewhere the trial's heartbeat tells. No MLflow here: what a dead trial's
MLflow run becomes is the driver's business (``on_dead``).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
from typing import Any, Callable

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from ..core.run_states import Failure
from .optuna_internals import live_system_attrs, stale_trial_ids, storage_of, trial_id

USER_ATTR_RUN_ID = "mlflow_run_id"
USER_ATTR_WORKER = "worker"  # {"host", "pid", "pid_started", "trial"}: who runs a trial
USER_ATTR_SEED = "sampler_seed"
USER_ATTR_FAILURE = "failure"  # pruned, killed, stale, error or interrupted: what a trial died of
# A trial that came from an earlier run (warm_start): that run's id, and how it came ("results":
# added finished with its values; "enqueue": its parameters run again here).
USER_ATTR_WARM_SOURCE = "warm_start.source_run_id"
USER_ATTR_WARM_MODE = "warm_start.as"
MAX_RETRY = 2  # a trial whose process dies is retried at most twice


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state name: {"COMPLETE": 12, "PRUNED": 3, "FAIL": 1, "RUNNING": 0, "WAITING": 0}."""
    return {s.name: sum(t.state == s for t in trials) for s in TrialState}


def count_metrics(trials: list[FrozenTrial]) -> dict[str, int]:
    """The parent's live-chart counts: ``trials/complete``, ``trials/pruned``, ``trials/fail``."""
    counts = state_counts(trials)
    return {f"trials/{name.lower()}": counts[name] for name in ("COMPLETE", "PRUNED", "FAIL")}


def mark_failure(storage: optuna.storages.BaseStorage, trial_id: int, kind: str) -> None:
    """Say what a trial died of (``USER_ATTR_FAILURE``), in Optuna as on its MLflow run: set while
    the trial still runs, since a finished trial's attributes are frozen. Optuna has one FAIL state
    for all of them (it declined a STALE one, optuna#5860)."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, USER_ATTR_FAILURE, kind)


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials whose parameters were enqueued again (by any later retry)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


class TrialBudget:
    """``n_trials`` in total, across workers and resumes.

    Finished means complete, pruned or failed, except a failed trial whose parameters were
    retried (a killed process): its retry counts instead. A worker may start a trial only while
    finished + running trials are fewer than ``n_trials`` (checked under the study lock).
    """

    def __init__(self, n_trials: int | None):
        self.n_trials = n_trials

    @staticmethod
    def finished(trials: list[FrozenTrial]) -> int:
        """Trials that ran in this study and are over (earlier runs' results added by a warm
        start ran elsewhere: they do not spend the budget)."""
        retried = retried_numbers(trials)
        return sum(1 for t in trials if not is_warm_result(t) and (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and t.number not in retried)))

    def has_room(self, trials: list[FrozenTrial]) -> bool:
        if self.n_trials is None:
            return True
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return self.finished(trials) + running < self.n_trials



def is_warm_result(trial: FrozenTrial) -> bool:
    """Whether the trial is an earlier run's result added by a warm start (not run here)."""
    return trial.user_attrs.get(USER_ATTR_WARM_MODE) == "results"


def this_worker() -> dict[str, Any]:
    """Who runs a trial: host, pid and the process's start time (pids are reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": round(psutil.Process().create_time(), 2)}


def is_dead_here(worker: dict[str, Any]) -> bool:
    """Whether the worker ran on this host and its process is gone (or the pid is another's)."""
    if worker.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(worker["pid"])).create_time() - float(worker["pid_started"])) > 1.0
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a dead or interrupted trial's parameters again (at most ``MAX_RETRY`` times)."""
    with warnings.catch_warnings():
        # Optuna marks it experimental (since 2.8): known, and an interrupt's one line stays one line.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def own_record(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's ``worker`` record, when it is its own (a retry inherits its predecessor's)."""
    worker = trial.user_attrs.get(USER_ATTR_WORKER) or {}
    return worker if worker.get("trial") == trial.number else {}


def fail_dead_trials(study: optuna.Study, on_dead: Callable[[optuna.Study, FrozenTrial], None],
                     finished_value: Callable[[FrozenTrial], list[float] | None] | None = None) -> list[int]:
    """Fail the running trials whose process is gone: at once on this host, by heartbeat elsewhere
    (the storage calls its stale-trial callback for those). A dead trial whose work had finished
    (``finished_value`` gives its objective: its process died after ending its run, before telling
    Optuna) is recorded COMPLETE with that value instead: its parameters are not run again.

    Args:
        study: the study.
        on_dead: called with each trial failed here (its MLflow run, its retry).
        finished_value: the objectives a dead trial finished with (one value each), or None.

    Returns:
        The numbers of the trials failed here.
    """
    storage = storage_of(study)
    failed = []
    stale = stale_trial_ids(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = own_record(trial)
        dead_here = bool(worker) and is_dead_here(worker)
        if not dead_here and trial_id(trial) not in stale:
            continue
        value = finished_value(trial) if finished_value is not None else None
        try:
            if value is not None:
                storage.set_trial_state_values(trial_id(trial), state=TrialState.COMPLETE, values=list(value))
            elif not dead_here:
                mark_failure(storage, trial_id(trial), Failure.STALE)  # failed below by Optuna's fail_stale_trials
            else:
                mark_failure(storage, trial_id(trial), Failure.KILLED)
                if not storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
                    continue
                failed.append(trial.number)
                on_dead(study, storage.get_trial(trial_id(trial)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds while it runs (a thread)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a database hiccup: the next beat retries
                self.storage.record_heartbeat(self.trial_id)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def is_own_setting(trial: optuna.Trial | FrozenTrial) -> bool:
    """Whether the trial runs one of the study's enqueued settings (or a retry of one): those run
    as the file fixes them; the others are tuning trials (the file's ``tuning`` settings)."""
    attrs = trial.system_attrs if isinstance(trial, FrozenTrial) else live_system_attrs(trial)
    return "fixed_params" in attrs


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether the trial meets the study's constraints (Optuna's rule: every constraint value <= 0;
    a trial without constraints is feasible)."""
    return all(value <= 0.0 for value in (getattr(trial, "constraints", None) or {}).values())


def _sign(direction) -> float:
    return 1.0 if direction in ("maximize", optuna.study.StudyDirection.MAXIMIZE) else -1.0


def pareto_optimal(trials: list, directions) -> list:
    """The complete, feasible trials that no other such trial dominates (at least as good on
    every objective, better on one), in trial-number order: the study's Pareto front.

    Args:
        trials: FrozenTrials (or anything with number, state, values and constraints).
        directions: one per objective, "maximize"/"minimize" or Optuna's StudyDirection.
    """
    signs = [_sign(d) for d in directions]
    candidates = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
                         and is_feasible(t)), key=lambda t: t.number)
    scored = [(t, [s * v for s, v in zip(signs, t.values)]) for t in candidates]

    def dominated(mine: list[float]) -> bool:
        return any(all(o >= m for o, m in zip(other, mine)) and any(o > m for o, m in zip(other, mine))
                   for _, other in scored)

    # Equal points are all on the front (as Optuna's ``study.best_trials`` has them).
    return [trial for trial, mine in scored if not dominated(mine)]


def best_per_group(trials: list[FrozenTrial], key: str | None, direction: str) -> dict[str, FrozenTrial]:
    """The best complete, feasible trial (by the first objective) of each value of ``key`` (all:
    one group "best").

    Selection reads the objective, a validation metric: the study compares pooling types, fc
    widths or layers by the test accuracy of each group's best trial, computed once after this.
    An infeasible trial (a constraint broken) is never best.
    """
    sign = _sign(direction)
    best: dict[str, FrozenTrial] = {}
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not is_feasible(trial):
            continue
        group = str(trial.params.get(key)) if key else "best"
        if group not in best or sign * trial.values[0] > sign * best[group].values[0]:
            best[group] = trial
    return best
