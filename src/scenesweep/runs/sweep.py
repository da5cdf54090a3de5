"""A study: one worker's part, from the checks to the summary (``run_study``).

* The setting is checked before any trial, the study opened (or created) in its storage, the
  study's one parent run found or created (``runs.parent``).
* Trials are asked for and told by hand (Optuna's ask-and-tell interface) under the study lock
  (a file lock for SQLite, an advisory lock for PostgreSQL), so that workers never start more
  than ``n_trials`` in total. Each trial sends heartbeats; a trial whose process died is failed
  (at once when its process is known dead on this host, else when its heartbeat goes stale), its
  MLflow run marked FAILED and its parameters retried.
* A worker out of budget waits for the trials running at that moment to end or go stale, so a
  finished sweep leaves nothing RUNNING; the worker that sees the study finished summarises it
  (``runs.summary``).
* Trials share the feature cache (and an in-process memo): a 50-trial SVM sweep extracts once,
  an fc-width sweep computes the convolutions once and only fc6/fc7 per width.

The setting's checks are in ``runs.study_setting``, what happens to a dead trial in
``runs.dead_trials``, the summary in ``runs.summary`` (its tables and plots in ``runs.study_artifacts``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
import warnings

import mlflow
import optuna
from optuna.trial import TrialState

from ..core import faults
from ..core.disk_space import StoreFullError, disk_full_message, is_disk_full, release_reserve
from ..core.errors import ConfigError, UserError
from ..core.progress import progress_bar
from ..core.run_states import Failure, Status
from ..core.store_urls import redact
from ..search.sampling import TrialSeededSampler, build_pruner, build_sampler, check_sampler
from ..search.optuna_storage import DEFAULT_HEARTBEAT_S, open_storage, resolve_storage, study_lock
from ..search.optuna_internals import storage_of, trial_id
from ..search.trials import (USER_ATTR_SEED, USER_ATTR_WORKER, Heartbeat, TrialBudget, count_metrics,
                             best_per_group, fail_dead_trials, is_feasible, mark_failure, pareto_optimal, retry,
                             state_counts, this_worker)
from ..specs.studies import SAMPLERS, StudySpec
from ..tracking import lifecycle, mlflow_store, sink
from .dead_trials import dead_here_callback, finished_value, mark_dead, stale_trial_callback
from .objective import Objective
from .parent import attach_parent
from .study_setting import check_same_setting, check_study_setting, study_setting
from .study_outcome import StudyOutcome
from .summary import claim_summary, summarise
from .warm_start import EarlierTrial, add_earlier_trials, find_earlier_trials

STUDY_ATTR_ENQUEUED = "own_settings_enqueued"  # set once every enqueued setting is in the storage


@dataclasses.dataclass
class Sweep:
    """One worker's part in a study: what it needs to run trials and to summarise."""

    spec: StudySpec
    study: optuna.Study
    rdb: optuna.storages.RDBStorage
    budget: TrialBudget
    timeout: float | None
    heartbeat_s: int
    parent_id: str
    objective: Objective
    progress: bool
    ran: list[int] = dataclasses.field(default_factory=list)  # trial numbers this worker ran
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        return storage_of(self.study)

    def lock(self) -> contextlib.AbstractContextManager:
        return study_lock(self.rdb, self.study.study_name)

    def settle(self) -> None:
        """Fail the trials of dead workers (at once on this host, by heartbeat elsewhere); record
        those that had finished their work (their run FINISHED with the objective)."""
        fail_dead_trials(self.study, dead_here_callback, finished_value(self.spec))


def _start_trial(sweep: Sweep, deadline: float | None) -> optuna.Trial | None:
    """A new trial when the budget and the deadline allow one (under the study lock), else None."""
    with sweep.lock():
        if sweep.stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
            return None
        if not sweep.budget.has_room(sweep.study.get_trials(deepcopy=False)):
            return None
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize: ours are sent by Heartbeat.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = sweep.study.ask()
        # Recorded before the lock is released: another worker on this host may check it.
        trial.set_user_attr(USER_ATTR_WORKER, {**this_worker(), "trial": trial.number})
        return trial


def _run_trial(sweep: Sweep, trial: optuna.Trial, bar) -> None:
    """Run the objective under heartbeats, tell Optuna, and log the study's progress on the parent."""
    seed = sweep.study.sampler.seed_of(trial.number) if isinstance(sweep.study.sampler, TrialSeededSampler) else None
    trial.set_user_attr(USER_ATTR_SEED, seed)
    value, state, error, pruned = None, TrialState.COMPLETE, None, ""
    began = time.monotonic()
    with Heartbeat(sweep.storage, trial_id(trial), sweep.heartbeat_s):
        try:
            value = sweep.objective(trial, seed=seed)
        except optuna.TrialPruned as why:
            state, pruned = TrialState.PRUNED, str(why)
            mark_failure(sweep.storage, trial_id(trial), Failure.PRUNED)
        except KeyboardInterrupt:
            # Interrupted, not broken: failed in the storage and its parameters retried on resume.
            mark_failure(sweep.storage, trial_id(trial), Failure.INTERRUPTED)
            _tell(sweep, trial, TrialState.FAIL)
            mark_dead(sweep.study, sweep.storage.get_trial(trial_id(trial)), "was interrupted", Failure.INTERRUPTED)
            raise
        except Exception as caught:  # the study survives a failing trial
            state, error = TrialState.FAIL, caught
            if is_disk_full(caught):
                # Every next trial would fail too: this one is failed and retried on resume, the sweep stops.
                release_reserve(mlflow_store.store_folder())
                with contextlib.suppress(Exception):
                    mark_failure(sweep.storage, trial_id(trial), Failure.ERROR)
                    _tell(sweep, trial, TrialState.FAIL)
                    retry(sweep.study, sweep.storage.get_trial(trial_id(trial)))
                raise
            mark_failure(sweep.storage, trial_id(trial), Failure.ERROR)
    if state == TrialState.COMPLETE:
        faults.moment("trial-run-ended")
    _tell(sweep, trial, state, value)
    sweep.ran.append(trial.number)
    if error is not None:
        print(f"trial #{trial.number} failed: {error.__class__.__name__}: {error}"
              + ("" if isinstance(error, UserError) else " (traceback: artifact error/traceback.txt of its run)"),
              file=sys.stderr)
    else:
        # One line per trial, a log a person can read (above the bar on a terminal).
        line = trial_line(sweep, trial, state, value, pruned, time.monotonic() - began)
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
    log_progress(sweep, trial.number)
    if bar is not None:
        # The best first, then the count: off a terminal ``update`` prints the line, which must
        # never report an older best than the trial line above it.
        best = best_per_group(sweep.study.get_trials(deepcopy=False), None, sweep.spec.direction)
        if best and not sweep.spec.multi_objective:
            bar.set_postfix_str(f"best {sweep.spec.metric}={best['best'].values[0]:.4f}", refresh=False)
        bar.update(1)


def trial_line(sweep: Sweep, trial: optuna.Trial, state: TrialState, value, pruned: str,
               seconds: float) -> str:
    """'trial #3 C=0.012 layer=relu7: val/acc 0.9550 in 4.2 s (best 0.9600, #1)', or '...: pruned
    at epoch 2 ...'; with several objectives each one and the Pareto front's size; an infeasible
    trial says so."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    values = value if isinstance(value, (list, tuple)) else [value]
    outcome = (", ".join(f"{m} {v:.4g}" for m, v in zip(sweep.spec.metrics, values)) if state == TrialState.COMPLETE
               else (pruned or state.name.lower()))
    frozen = sweep.storage.get_trial(trial_id(trial))
    if state == TrialState.COMPLETE and not is_feasible(frozen):
        outcome += " (infeasible: " + ", ".join(k for k, v in frozen.constraints.items() if v > 0) + ")"
    trials = sweep.study.get_trials(deepcopy=False)
    best = ""
    if sweep.spec.multi_objective:
        best = f" (Pareto front: {len(pareto_optimal(trials, sweep.spec.directions))} trials)"
    else:
        found = best_per_group(trials, None, sweep.spec.direction)
        if found:
            best = f" (best {found['best'].values[0]:.4f}, #{found['best'].number})"
    return f"trial #{trial.number} {shown}: {outcome} in {seconds:.1f} s{best}"


def _tell(sweep: Sweep, trial: optuna.Trial, state: TrialState, value=None) -> None:
    """Tell Optuna how the trial ended (``value``: one float, or a list with several objectives)."""
    try:
        if state == TrialState.COMPLETE:
            sweep.study.tell(trial, value)
        else:
            sweep.study.tell(trial, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as error:
        # Failed meanwhile by another worker (its heartbeat looked stale): its retry stands.
        print(f"trial #{trial.number}: {error}", file=sys.stderr)


def log_progress(sweep: Sweep, number: int) -> None:
    """The parent's live chart: this trial's objective, the best so far, and the counts by state,
    at step = trial number (the optimisation history while the study runs)."""
    trials = sweep.study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    metrics = count_metrics(trials)
    if trial is not None and trial.state == TrialState.COMPLETE:
        for metric, value in zip(sweep.spec.metrics, trial.values):
            metrics[f"trial/{metric}"] = value
    if sweep.spec.multi_objective:
        metrics["pareto/size"] = len(pareto_optimal(trials, sweep.spec.directions))
    else:
        found = best_per_group(trials, None, sweep.spec.direction)  # feasible trials only
        if found:
            # The same name as the final best (runs.summary._log_best): one chart, its last point the result.
            metrics[f"best/{sweep.spec.metric}"] = found["best"].values[0]
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        sink.log_batch(sweep.parent_id, metrics=metrics, step=number)


def _work(sweep: Sweep, deadline: float | None, bar) -> None:
    """Start trials until the budget (all workers together) or this worker's deadline is reached."""
    while True:
        sweep.settle()
        trial = _start_trial(sweep, deadline)
        if trial is None:
            return
        _run_trial(sweep, trial, bar)


def _wait_for_running(sweep: Sweep, deadline: float | None) -> bool:
    """Wait until the trials running now (other workers') end or are failed as dead.

    Returns:
        True when a dead trial's retry left room for more trials within the deadline.
    """
    waiting_for = {t.number for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    poll = min(5.0, max(0.5, sweep.heartbeat_s / 2))
    while waiting_for:
        sweep.settle()
        trials = sweep.study.get_trials(deepcopy=False)
        if sweep.budget.has_room(trials) and (deadline is None or time.monotonic() < deadline) \
                and any(t.state == TrialState.WAITING for t in trials):
            return True
        if not {t.number for t in trials if t.state == TrialState.RUNNING} & waiting_for:
            return False
        time.sleep(poll)
    return False


def run_worker(sweep: Sweep, n_jobs: int = 1) -> None:
    """This worker's trials (``n_jobs`` threads), then its wait for the trials of others."""
    deadline = None if sweep.timeout is None else time.monotonic() + sweep.timeout
    total = sweep.budget.n_trials
    trials = sweep.study.get_trials(deepcopy=False)
    bar = progress_bar(total=total, initial=sweep.budget.finished(trials) if total else 0, unit="trial",
                       desc=f"study {sweep.study.study_name}", disable=not sweep.progress)
    try:
        while True:
            threads = [threading.Thread(target=_work, args=(sweep, deadline, bar), daemon=True)
                       for _ in range(n_jobs - 1)]
            for thread in threads:
                thread.start()
            try:
                _work(sweep, deadline, bar)
            except BaseException:
                sweep.stop.set()  # the other threads end after their current trial
                raise
            finally:
                for thread in threads:
                    thread.join()
            if not _wait_for_running(sweep, deadline):
                return
    finally:
        bar.close()


def open_study(spec: StudySpec, storage_url: str, study_name: str, heartbeat_s: int,
               dataset_fingerprint: str | None = None, earlier: list[EarlierTrial] | None = None):
    """The study in its storage (created on first use), its setting recorded or checked, its
    own points enqueued once, and the earlier trials of a warm start added once.
    Returns (RDB storage, study, how many earlier trials this worker added)."""
    rdb = open_storage(storage_url, heartbeat_s, on_stale=stale_trial_callback)
    try:
        study = optuna.create_study(study_name=study_name, storage=rdb, sampler=build_sampler(spec),
                                    pruner=build_pruner(spec), directions=list(spec.directions), load_if_exists=True)
    except ValueError as error:  # a study stored with other directions
        raise ConfigError(f"study {study_name!r} in {redact(storage_url)}: {error}; start a new study with "
                          "--study_name NAME") from None
    if [d.name.lower() for d in study.directions] != list(spec.directions):
        raise ConfigError(f"study {study_name!r} in {redact(storage_url)} was created with the objectives' directions "
                          f"{[d.name.lower() for d in study.directions]}, this file says {list(spec.directions)}; "
                          "start a new study with --study_name NAME")
    with study_lock(rdb, study_name):
        # optuna-dashboard labels the objective axes with these ("Objective 0" otherwise).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metrics))
        check_same_setting(study, spec, storage_url, dataset_fingerprint)
        if not study.user_attrs.get("mlflow_experiment"):
            study.set_user_attr("mlflow_experiment", spec.mlflow_experiment)
            study.set_user_attr("description", spec.description)
        # The study's own settings, all of them: a worker killed while enqueuing them left some out,
        # and the next one completes the list (a setting already queued or run is not added again).
        if STUDY_ATTR_ENQUEUED not in study.user_attrs:
            for params in spec.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
                faults.moment("study-enqueue")
            study.set_user_attr(STUDY_ATTR_ENQUEUED, len(spec.enqueue))
        added = add_earlier_trials(study, spec, earlier or [])
    return rdb, study, added


def _run_here(sweep: Sweep, created: bool, n_jobs: int) -> None:
    """This worker's trials, with the parent's system metrics sampled meanwhile (a joining worker
    under its own node id, system/<host>-<pid>/...)."""
    monitor = sink.system_metrics_monitor(sweep.parent_id, node_id=None if created else
                                          f"{socket.gethostname()}-{os.getpid()}")
    try:
        run_worker(sweep, n_jobs=n_jobs)
    except Exception as error:
        if not is_disk_full(error):
            raise
        with contextlib.suppress(Exception):  # the parent resumes with the study
            lifecycle.end_run(sweep.parent_id, Status.FAILED, error, failure=Failure.ERROR)
        raise StoreFullError(disk_full_message(error, mlflow_store.store_folder())) from None
    except KeyboardInterrupt as error:
        with contextlib.suppress(Exception):
            if not any(t.state == TrialState.RUNNING for t in sweep.study.get_trials(deepcopy=False)):
                lifecycle.end_run(sweep.parent_id, Status.KILLED, f"interrupted by {error}" if str(error) else "interrupted",
                                  failure=Failure.INTERRUPTED)
        raise
    finally:
        if monitor is not None:
            monitor.finish()


def run_study(spec: StudySpec, storage: str | None = None, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None, n_jobs: int = 1,
              heartbeat_s: int = DEFAULT_HEARTBEAT_S, progress: bool = True, register: bool = True,
              keep_best_per: str | None = None) -> StudyOutcome:
    """Run (or resume, or join) the study of ``spec``: its trials nested under the study's parent run.

    The setting is checked before any trial (one ``ConfigError``). Any number of workers may run
    this at once on one storage: together they finish exactly ``n_trials``; the worker that sees
    the study finished summarises it. The best trial's head is kept as trials complete (and the
    best of each value of ``keep_best_per``), so that the test split is scored with it.

    Returns:
        The study's outcome (``runs.study_outcome``): parent run id, study name, trials and
        states, the trials this worker ran; when this worker summarised, its ``Summary``: the best
        trial (number, params, values, run id, its test-scored result, the version registered),
        or the error or note that says why there is none.
    """
    storage_url = resolve_storage(storage)
    study_name = study_name or spec.study
    n_trials = n_trials if n_trials is not None else spec.n_trials
    check_sampler(spec), build_pruner(spec)  # a bad sampler or pruner option: before anything
    data = check_study_setting(spec)
    mlflow_store.setup_tracking()
    fingerprint = data[0].fingerprint if data else None
    earlier = find_earlier_trials(spec, study_setting(spec, fingerprint)) if spec.warm_start else []
    if spec.constraints and not SAMPLERS[spec.sampler["name"]].constraints:
        print(f"note: sampler {spec.sampler['name']} does not use constraints in its search (tpe, gp, nsgaii and "
              "nsgaiii do); infeasible trials are still never best nor registered", file=sys.stderr)
    rdb, study, added = open_study(spec, storage_url, study_name, heartbeat_s, fingerprint, earlier)
    fail_dead_trials(study, dead_here_callback, finished_value(spec))
    parent_id, experiment_id, created = attach_parent(study, spec, storage_url, study_lock(rdb, study_name))
    if added:
        source = spec.warm_start.experiment or spec.warm_start.study
        how = "added with their results" if spec.warm_start.mode == "results" else "enqueued to run first"
        print(f"warm start: {added} earlier trials of {source!r} {how}", file=sys.stderr)
        sink.log_batch(parent_id, tags={"warm_start.count": added, "warm_start.as": spec.warm_start.mode,
                                        "warm_start.source": source,
                                        "warm_start.where": spec.warm_start.where or "(all)"})
    objective = Objective(spec, study_name, parent_id, experiment_id, data=data, progress=progress,
                          keep_best_per=keep_best_per)
    sweep = Sweep(spec, study, rdb, TrialBudget(n_trials), timeout if timeout is not None else spec.timeout,
                  heartbeat_s, parent_id, objective, progress)
    sink.log_batch(parent_id, tags={"budget.n_trials": n_trials, "budget.timeout": sweep.timeout})
    _run_here(sweep, created, n_jobs)
    trials = study.get_trials(deepcopy=False)
    outcome = StudyOutcome(parent_id, study.study_name, len(trials), state_counts(trials), len(sweep.ran),
                           TrialBudget.finished(trials))
    if claim_summary(study, parent_id, sweep.lock()):
        outcome.summary = summarise(study, spec, parent_id, register=register, progress=progress)
    return outcome
