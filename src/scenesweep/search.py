"""Optuna studies tracked in MLflow: one parent run per study, one nested run per trial.

* A study is one parent MLflow run, whoever runs its trials: the first worker creates it and
  records its id in the study (user attribute ``mlflow_parent_run_id``); every later worker, on
  this machine or another, and every resume attach their trials to it. The worker that sees the
  study finished (its budget spent, no trial running) summarises it once: best trial, plots,
  the one test evaluation, the registered model; then it ends the parent run.
* Trials are asked for and told by hand (Optuna's ask-and-tell interface) under a lock on the
  study (a file lock for SQLite, an advisory lock for PostgreSQL), so that workers never start
  more than ``n_trials`` in total. Each trial sends heartbeats; a trial whose process died is
  failed (at once when its process is known dead on this host, else when its heartbeat goes
  stale), its MLflow run is marked FAILED and its parameters are retried.
* The study file's sampler is rebuilt for every trial with a seed derived from the study's seed
  and the trial number: one worker reproduces a seeded study exactly, and parallel workers or
  a resume never draw the same start-up points.
* Trials share the feature cache (and an in-process memo), so a 50-trial SVM sweep extracts
  once; an fc-width sweep computes the convolutions once and only fc6/fc7 per width. Children
  are created with ``MlflowClient`` and an explicit parent run id, so they are linked with
  ``n_jobs > 1`` too; their metrics go in one ``log_batch`` each.
* Selection reads the validation metric only; test accuracy is computed once, for the best
  trial, and logged on the parent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import numpy as np
import optuna
import psutil
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from . import tracking
from .config import ConfigError, UserError, repo_root
from .studies import Dimension, StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, **kw),
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed),
}
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "none": lambda **kw: optuna.pruners.NopPruner(),
    "median": lambda **kw: optuna.pruners.MedianPruner(**kw),
    "successive_halving": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(**kw),
    "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(**kw),
}
USER_ATTR_RUN_ID = "mlflow_run_id"
USER_ATTR_WORKER = "worker"  # {"host", "pid", "pid_started", "trial"}: who runs a trial
USER_ATTR_SEED = "sampler_seed"
STUDY_ATTR_PARENT = "mlflow_parent_run_id"
STUDY_ATTR_SUMMARY = "summary"  # {"finished", "parent", "best_trial", "registered_version", ...}
STUDY_ATTR_SUMMARY_CLAIM = "summary_claim"
# Tags a trial's run takes from its parent: who ran it, from what source and commit.
INHERITED_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                  "mlflow.source.git.branch", "mlflow.source.git.repoURL", "mlflow.project.entryPoint")
DEFAULT_HEARTBEAT_S = 30
MAX_RETRY = 2  # a trial whose process dies is retried at most twice
CLAIM_EXPIRY_S = 3600  # a summary claimed by a worker that never wrote it is taken over after this
STORAGE_ENV = "OPTUNA_STORAGE"  # Optuna's own variable (its CLI reads it too)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

def default_storage() -> str:
    """``optuna.db`` beside the MLflow SQLite store (so temporary stores stay together)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri()
    database = tracking.sqlite_path(uri)
    folder = database.parent if database is not None else repo_root() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').as_posix()}"


def resolve_storage(storage: str | None) -> str:
    """``--storage``, else ``OPTUNA_STORAGE``, else the SQLite default beside the MLflow store."""
    return storage or os.environ.get(STORAGE_ENV) or default_storage()


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for locks instead of failing at once.

    Raises:
        ConfigError: a bad URL, a missing driver, an unreachable server, a folder that does not exist.
    """
    database = tracking.sqlite_path(url)
    if url.startswith("sqlite:") and database is None:
        raise ConfigError(f"storage={url!r}: expected sqlite:////absolute/path/optuna.db or a database URL")
    if database is not None:
        tracking.check_database_folder(database, f"storage={url!r}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if database is not None else {}
    with warnings.catch_warnings(), tracking.sqlite_creation_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=2 * heartbeat_s,
                                              heartbeat_stale_trial_callback=stale_trial_callback)
        except Exception as error:  # SQLAlchemy: bad URL, missing driver, unreachable server
            raise ConfigError(f"storage={tracking.redact(url)!r}: cannot open the Optuna storage "
                              f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]})") from None


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Exclusive access to the study's bookkeeping (budget, parent run, summary) across workers.

    SQLite (one machine): a file lock beside the database. PostgreSQL (any number of machines):
    a session advisory lock, released by the server if the worker dies holding it. Other
    databases: none (two workers may then overshoot ``n_trials`` by one trial each).
    """
    url = str(storage.url)
    database = tracking.sqlite_path(url)
    key = int.from_bytes(hashlib.sha256(f"scenesweep:{study_name}".encode()).digest()[:8], "big", signed=True)
    with _THREAD_LOCK:
        if database is not None:
            digest = hashlib.sha256(study_name.encode()).hexdigest()[:16]
            with open(database.parent / f".{database.name}.{digest}.lock", "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
        elif url.startswith("postgresql"):
            import sqlalchemy

            with storage.engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
        else:
            yield


_THREAD_LOCK = threading.RLock()  # the threads of one worker (n_jobs > 1) take turns too


# ---------------------------------------------------------------------------------------------
# Sampler, pruner, budget
# ---------------------------------------------------------------------------------------------

def trial_seed(study_seed: int | None, number: int) -> int | None:
    """The sampler seed of trial ``number``: a function of the study's seed and the number only."""
    if study_seed is None:
        return None
    return int(np.random.SeedSequence([int(study_seed), int(number)]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """The study file's sampler, built afresh for each trial with ``trial_seed(seed, number)``.

    Every worker builds the sampler from the study file with the same seed: sampled as is,
    parallel workers (and a resume) would draw the same random start-up points. Trial numbers
    are unique in the storage, so seeding by them keeps one worker's seeded study reproducible
    while no two trials share a seed. What the sampler learns comes from the study's trials in
    the storage, not from the sampler object, so nothing is lost by rebuilding it.
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None):
        self._make = make
        self._seed = seed
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}
        self._lock = threading.Lock()

    def seed_of(self, number: int) -> int | None:
        return trial_seed(self._seed, number)

    def _sampler(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._by_trial:
                self._by_trial[trial.number] = self._make(self.seed_of(trial.number))
            return self._by_trial[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        with self._lock:
            self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:  # seeds come from trial numbers
        pass


def build_sampler(spec: StudySpec) -> TrialSeededSampler:
    options = {k: v for k, v in spec.sampler.items() if k not in ("name", "seed")}
    factory = SAMPLERS[spec.sampler["name"]]
    return TrialSeededSampler(lambda seed: factory(seed, **options), spec.sampler.get("seed"))


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    try:
        return PRUNERS[spec.pruner["name"]](**{k: v for k, v in spec.pruner.items() if k != "name"})
    except (TypeError, ValueError) as error:  # an option Optuna refuses (studies.py checks the names)
        raise ConfigError(f"{spec.path}: pruner: {error}") from None


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
        retried = retried_numbers(trials)
        return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and t.number not in retried))

    def has_room(self, trials: list[FrozenTrial]) -> bool:
        if self.n_trials is None:
            return True
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return self.finished(trials) + running < self.n_trials

    def remaining(self, trials: list[FrozenTrial]) -> int | None:
        return None if self.n_trials is None else max(0, self.n_trials - self.finished(trials))


# ---------------------------------------------------------------------------------------------
# Workers, heartbeats and dead trials
# ---------------------------------------------------------------------------------------------

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


def _fail_run(client: MlflowClient, run_id: str, reason: str) -> None:
    """Mark a run FAILED (with why) unless it already ended."""
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_tag(run_id, "error", reason)
        client.set_terminated(run_id, "FAILED")


def retry_trial(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
    """A trial whose process died or was interrupted: its MLflow run FAILED (unless it ended),
    its parameters enqueued again (at most ``MAX_RETRY`` times)."""
    worker = trial.user_attrs.get(USER_ATTR_WORKER) or {}
    run_id = trial.user_attrs.get(USER_ATTR_RUN_ID) if worker.get("trial") == trial.number else None
    if run_id:
        where = f"{worker.get('host')}:{worker.get('pid')}" if worker else "its worker"
        _fail_run(MlflowClient(), run_id, f"process {where} {why}; parameters retried")
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def stale_trial_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback for a trial whose heartbeat went stale (its process died anywhere)."""
    retry_trial(study, trial, "died mid-trial (its Optuna heartbeat went stale)")


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the running trials whose process is gone: at once on this host, by heartbeat elsewhere.

    Returns:
        The numbers of the trials failed here (their parameters are retried).
    """
    storage = study._storage
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(USER_ATTR_WORKER) or {}
        # A retried trial inherits its predecessor's attributes: only its own record counts.
        if worker.get("trial") != trial.number or not is_dead_here(worker):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                retry_trial(study, storage.get_trial(trial._trial_id),
                            "died mid-trial (its pid is gone on this host; heartbeat not awaited)")
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


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------

def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """Ask the trial for one value per space dimension."""
    params = {}
    for name, dim in space.items():
        if dim.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
    return params


def trial_run_name(spec: StudySpec, number: int, params: dict[str, Any]) -> str:
    """'sweep_svm #7 C=0.012 layer=relu7'."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"{spec.study} #{number} {shown}"


class Objective:
    """Runs one trial as a nested MLflow run; receives the study, its parent run and data once.

    Args:
        spec: the study file.
        study_name: the Optuna study's name (``--study_name`` may differ from the file's).
        parent_run_id, experiment_id: where the trial's runs go.
        data: the dataset and split checked before the first trial, reused by every trial whose
            data parameters are the study's fixed ones (None: each trial loads its own).
    """

    def __init__(self, spec: StudySpec, study_name: str, parent_run_id: str, experiment_id: str,
                 data=None, progress: bool = True):
        self.spec = spec
        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.data = data
        self.progress = progress
        self.client = MlflowClient()
        # MlflowClient.create_run adds none of the tags fluent runs get: the UI would show
        # "Created by -" and no source for every trial. Trials share their parent's.
        self.inherited_tags = {k: v for k, v in self.client.get_run(parent_run_id).data.tags.items()
                               if k in INHERITED_TAGS}
        self._hardware: dict[str, str] | None = None
        self._lock = threading.Lock()  # one extraction at a time when n_jobs > 1

    def _data_for(self, config):
        from .training import DATA_PARAMETERS

        if self.data is None or set(DATA_PARAMETERS) & set(self.spec.space):
            return None
        return self.data

    def __call__(self, trial: optuna.Trial, seed: int | None = None) -> float:
        from .training import fit_head, prepare

        params = suggest(trial, self.spec.space)
        config = self.spec.trial_config(params)
        worker = this_worker()
        run = self.client.create_run(
            self.experiment_id, run_name=trial_run_name(self.spec, trial.number, params),
            tags={**self.inherited_tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, "study": self.study_name,
                  "trial_number": str(trial.number), "entry_point": f"sweep:{self.spec.study}",
                  "optuna.storage_study": self.study_name, "pid": str(worker["pid"]), "host": worker["host"],
                  "sampler_seed": str(seed),
                  "mlflow.note.content": f"Trial #{trial.number} of study `{self.study_name}`: "
                                         + ", ".join(f"{k}={v}" for k, v in params.items())
                                         + f"; objective {self.spec.direction} {self.spec.metric}."})
        run_id = run.info.run_id
        trial.set_user_attr(USER_ATTR_RUN_ID, run_id)
        try:
            with self._lock:
                prepared = prepare(config, progress=self.progress, data=self._data_for(config))
            if self._hardware is None:
                self._hardware = tracking.hardware(prepared.features.device)
            tracking.log_batch(run_id, params={**tracking.config_params(config), "head": config.head,
                                               "dataset_fingerprint": prepared.dataset.fingerprint},
                               tags={"cache_key": prepared.features.key,
                                     "cache": "hit" if prepared.features.hit else "miss",
                                     "conv_cache": prepared.features.conv_state,
                                     **{f"hardware.{k}": v for k, v in self._hardware.items()},
                                     **tracking.unit_tags(config)})
            log_epoch = tracking.epoch_logger(run_id)

            def on_epoch(epoch: int, metrics: dict) -> None:
                log_epoch(epoch, metrics)
                trial.report(metrics[self.spec.metric], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.spec.metric}={metrics[self.spec.metric]:.4f}")

            result = fit_head(prepared, config, on_epoch=on_epoch)
            per_epoch = set(result.history[-1]) if result.history else set()
            tracking.log_batch(run_id, metrics={**{k: v for k, v in result.metrics.items() if k not in per_epoch},
                                                **tracking.timing_metrics(result.timings)},
                               step=len(result.history))
            value = result.metrics[self.spec.metric]
            if not math.isfinite(value):
                raise ValueError(f"{self.spec.metric} is {value}")
        except optuna.TrialPruned as pruned:
            self.client.set_tag(run_id, "pruned", str(pruned) or "true")
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as error:
            self.client.set_tag(run_id, "error", f"{error.__class__.__name__}: {error}"[:5000])
            if not isinstance(error, (UserError, KeyboardInterrupt)):
                # A bug, not bad input: the whole traceback beside the run, one line on the terminal.
                with contextlib.suppress(Exception):
                    self.client.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
            # Ctrl-C stops the study: the trial was interrupted, not broken.
            self.client.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return value


# ---------------------------------------------------------------------------------------------
# The study: set-up, the worker loop, the summary
# ---------------------------------------------------------------------------------------------

# Settings that do not change what a trial measures: a study may resume with other values.
SETTING_FREE = ("cache_dir", "device", "batch_size")


def study_setting(spec: StudySpec) -> dict[str, str]:
    """The fixed settings a study's trials were measured under (data, weights, image size, ...)."""
    config = spec.trial_config({})
    return {k: str(v) for k, v in config.values.items() if k not in spec.space and k not in SETTING_FREE}


def check_same_setting(study: optuna.Study, spec: StudySpec, storage_url: str) -> None:
    """Record the setting of a new study; refuse to resume one made under another setting.

    Resuming a digits demo study with ``data=15-Scene`` would mix trials measured on two
    datasets (and could run no new trial at all): say so and how to start a new study instead.

    Raises:
        ConfigError: naming the settings that differ.
    """
    setting = study_setting(spec)
    recorded = study.user_attrs.get("setting")
    if recorded is None:
        study.set_user_attr("setting", setting)
        return
    differ = {k: (recorded.get(k), v) for k, v in setting.items() if recorded.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(differ.items()))
        raise ConfigError(f"study {study.study_name!r} in {tracking.redact(storage_url)} was run under other "
                          f"settings ({shown}); resume it with the same settings, or start a new study with "
                          "--study_name NAME (MLproject: -P study_name=NAME)")


def check_study_setting(spec: StudySpec):
    """The study's fixed setting checked before any trial (data, weights, device, cache folder).

    Returns:
        The dataset and split, loaded once for every trial (None when the study searches a
        data parameter).
    """
    from .training import check_setting

    try:
        return check_setting(spec.trial_config({}), skip=tuple(spec.space))
    except UserError as error:
        # The file names the setting (its fixed:) unless the command line overrode it.
        raise ConfigError(f"{spec.path}: {error}") from None


@dataclasses.dataclass
class Sweep:
    """One worker's part in a study: what it needs to run trials and to summarise."""

    spec: StudySpec
    study: optuna.Study
    storage_url: str
    budget: TrialBudget
    timeout: float | None
    heartbeat_s: int
    parent_id: str
    experiment_id: str
    objective: Objective
    progress: bool
    rdb: optuna.storages.RDBStorage
    ran: list[int] = dataclasses.field(default_factory=list)  # trial numbers this worker ran
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        return self.study._storage

    def lock(self) -> contextlib.AbstractContextManager:
        return study_lock(self.rdb, self.study.study_name)


def _describe(dim: Dimension) -> str:
    if dim.type == "categorical":
        return "{" + ", ".join(map(str, dim.choices)) + "}"
    return f"{dim.type}[{dim.low:g}, {dim.high:g}]" + (" log" if dim.log else "")


def attach_parent(study: optuna.Study, spec: StudySpec, storage_url: str, lock) -> tuple[str, str, bool]:
    """The study's parent run: the one the study records, else a new one (this worker's).

    Under ``mlflow run`` the project's run (MLFLOW_RUN_ID) becomes the parent of a new study;
    when the study has its parent already, the project's run is tagged as a worker run that
    points to it (``sweep=worker``), and the trials go under the study's parent.

    Returns:
        (parent run id, its experiment id, whether this worker created it).
    """
    client = MlflowClient()
    launched = os.environ.get("MLFLOW_RUN_ID")
    with lock:
        recorded = study.user_attrs.get(STUDY_ATTR_PARENT)
        parent = None
        if recorded:
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                parent = client.get_run(recorded)
            if parent is not None and parent.info.lifecycle_stage != "active":
                parent = None
        if parent is not None:
            if parent.info.status != "RUNNING":
                client.update_run(parent.info.run_id, status="RUNNING")  # resumed
            if launched and launched != parent.info.run_id:
                tracking.log_batch(launched, tags={
                    "sweep": "worker", "study": study.study_name, "study_parent_run_id": parent.info.run_id,
                    "mlflow.runName": f"{spec.study} worker {socket.gethostname()}:{os.getpid()}",
                    "mlflow.note.content": f"A worker of study `{study.study_name}`: its trials are nested under "
                                           f"the study's parent run `{parent.info.run_id}`."})
            return parent.info.run_id, parent.info.experiment_id, False
        tags = {"study": study.study_name, "study_file": str(spec.path), "optuna.storage": tracking.redact(storage_url),
                "entry_point": f"sweep:{spec.study}", "sweep": "parent",
                "mlflow.runName": f"{spec.study} study",
                "mlflow.note.content": f"Study `{study.study_name}` from `{spec.path}`\n\n"
                                       f"Command: `{tracking.command_line()}`\n\n{spec.description}"}
        if launched:
            run_id = launched
            experiment = client.get_run(launched).info.experiment_id
            tracking.warn_if_not_in_family(client.get_run(launched), spec.experiment)
            tracking.log_batch(run_id, tags=tags)
        else:
            experiment = tracking.experiment_id(spec.experiment)
            run_id = client.create_run(experiment, run_name=tags["mlflow.runName"],
                                       tags={**tracking.source_tags(), **tags}).info.run_id
        if not client.get_experiment(experiment).tags.get("mlflow.note.content"):
            # The experiments list shows it in its Description column.
            client.set_experiment_tag(experiment, "mlflow.note.content", spec.description)
        tracking.log_batch(run_id, params={"study_name": study.study_name, "tunes": spec.tunes,
                                           "objective": f"{spec.direction} {spec.metric}",
                                           "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
                                           **{f"fixed.{k}": v for k, v in spec.fixed.items()},
                                           **{f"space.{k}": _describe(d) for k, d in spec.space.items()}})
        client.log_artifact(run_id, str(spec.path), "study")
        study.set_user_attr(STUDY_ATTR_PARENT, run_id)
        return run_id, experiment, True


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
    value, state, error = None, TrialState.COMPLETE, None
    with Heartbeat(sweep.storage, trial._trial_id, sweep.heartbeat_s):
        try:
            value = sweep.objective(trial, seed=seed)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:
            # Interrupted, not broken: failed in the storage and its parameters retried on resume.
            _tell(sweep, trial, TrialState.FAIL)
            retry_trial(sweep.study, sweep.storage.get_trial(trial._trial_id), "was interrupted (Ctrl-C)")
            raise
        except Exception as caught:  # the study survives a failing trial
            state, error = TrialState.FAIL, caught
    _tell(sweep, trial, state, value)
    sweep.ran.append(trial.number)
    if error is not None:
        print(f"trial #{trial.number} failed: {error.__class__.__name__}: {error}"
              + ("" if isinstance(error, UserError) else " (traceback: artifact error/traceback.txt of its run)"),
              file=sys.stderr)
    log_progress(sweep, trial.number)
    if bar is not None:
        bar.update(1)
        with contextlib.suppress(ValueError):
            bar.set_postfix_str(f"best {sweep.spec.metric}={sweep.study.best_value:.4f}")


def _tell(sweep: Sweep, trial: optuna.Trial, state: TrialState, value: float | None = None) -> None:
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
    name = sweep.spec.metric.replace("/", "_")
    metrics = {f"trials/{s.name.lower()}": sum(t.state == s for t in trials)
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if trial is not None and trial.state == TrialState.COMPLETE:
        metrics[f"trial/{name}"] = trial.value
    with contextlib.suppress(ValueError):
        metrics[f"best/{name}"] = sweep.study.best_value
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        tracking.log_batch(sweep.parent_id, metrics=metrics, step=number)


def _work(sweep: Sweep, deadline: float | None, bar) -> None:
    """Start trials until the budget (all workers together) or this worker's deadline is reached."""
    while True:
        fail_dead_trials(sweep.study)
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
        fail_dead_trials(sweep.study)
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
    bar = tqdm(total=total, initial=sweep.budget.finished(trials) if total else 0, unit="trial",
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


def _claim_summary(sweep: Sweep) -> bool:
    """Whether this worker summarises the study now: nothing runs, and no one has summarised
    (or is summarising) the trials finished so far."""
    with sweep.lock():
        trials = sweep.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            return False  # a live worker finishes the study and summarises it
        finished = TrialBudget.finished(trials)
        attrs = sweep.study.user_attrs
        done = attrs.get(STUDY_ATTR_SUMMARY) or {}
        if done.get("finished") == finished and done.get("parent") == sweep.parent_id:
            return False
        claim = attrs.get(STUDY_ATTR_SUMMARY_CLAIM) or {}
        if (claim.get("finished") == finished and claim.get("parent") == sweep.parent_id
                and time.time() - claim.get("time", 0) < CLAIM_EXPIRY_S and not is_dead_here(claim.get("worker", {}))):
            return False
        sweep.study.set_user_attr(STUDY_ATTR_SUMMARY_CLAIM, {"finished": finished, "parent": sweep.parent_id,
                                                            "time": time.time(), "worker": this_worker()})
        return True


def run_study(spec: StudySpec, storage: str | None = None, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None, n_jobs: int = 1,
              heartbeat_s: int = DEFAULT_HEARTBEAT_S, progress: bool = True, register: bool = True) -> dict:
    """Run (or resume, or join) the study of ``spec``: its trials nested under the study's parent run.

    The setting is checked before any trial (one ``ConfigError``). Any number of workers may run
    this at once on one storage: together they finish exactly ``n_trials``; the worker that sees
    the study finished summarises it.

    Returns:
        A summary: parent run id, study name, trials and states, the trials this worker ran,
        whether it summarised; when it did and a trial completed: the best trial's number,
        params and value, its run id, the test accuracy of the best trial and its result.
    """
    storage_url = resolve_storage(storage)
    study_name = study_name or spec.study
    n_trials = n_trials if n_trials is not None else spec.n_trials
    timeout = timeout if timeout is not None else spec.timeout
    sampler, pruner = build_sampler(spec), build_pruner(spec)
    data = check_study_setting(spec)
    tracking.setup_tracking()
    rdb = open_storage(storage_url, heartbeat_s)
    study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler, pruner=pruner,
                                direction=spec.direction, load_if_exists=True)
    with study_lock(rdb, study_name):
        # optuna-dashboard labels the objective axis with this ("Objective 0" otherwise).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
        check_same_setting(study, spec, storage_url)
        if not study.user_attrs.get("mlflow_experiment"):
            study.set_user_attr("mlflow_experiment", spec.experiment)
            study.set_user_attr("description", spec.description)
        if not study.get_trials(deepcopy=False):
            for params in spec.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
    fail_dead_trials(study)
    parent_id, experiment_id, created = attach_parent(study, spec, storage_url, study_lock(rdb, study_name))
    objective = Objective(spec, study_name, parent_id, experiment_id, data=data, progress=progress)
    sweep = Sweep(spec, study, storage_url, TrialBudget(n_trials), timeout, heartbeat_s, parent_id,
                  experiment_id, objective, progress, rdb)
    client = MlflowClient()
    tracking.log_batch(parent_id, tags={"budget.n_trials": n_trials, "budget.timeout": timeout})
    # The parent's system metrics: each joining worker under its own node id (system/<host>-<pid>/...).
    monitor = tracking.system_metrics_monitor(parent_id, node_id=None if created else
                                              f"{socket.gethostname()}-{os.getpid()}")
    try:
        run_worker(sweep, n_jobs=n_jobs)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                client.set_terminated(parent_id, "KILLED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    trials = study.get_trials(deepcopy=False)
    summary = {"parent_run_id": parent_id, "study": study.study_name, "trials": len(trials),
               "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
               "ran_here": len(sweep.ran), "finished": TrialBudget.finished(trials), "summarised": False}
    if _claim_summary(sweep):
        summary.update(summarise(study, spec, parent_id, client, register=register, progress=progress))
        summary["summarised"] = True
    return summary


def summarise(study: optuna.Study, spec: StudySpec, parent_id: str, client: MlflowClient,
              register: bool = True, progress: bool = True) -> dict:
    """Best trial, trials table, plots, and the one test evaluation, logged on the parent.

    The parent run is active in this process meanwhile and ended here: FINISHED, or FAILED
    with an ``error`` tag when no trial completed.
    """
    from .training import evaluate_test_split, fit_head, prepare

    trials = study.get_trials(deepcopy=False)
    finished = TrialBudget.finished(trials)
    summary: dict[str, Any] = {}
    previous = study.user_attrs.get(STUDY_ATTR_SUMMARY) or {}
    with mlflow.start_run(run_id=parent_id, log_system_metrics=False) as active:
        frame = study.trials_dataframe()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trials.csv"
            frame.to_csv(path, index=False)
            mlflow.log_artifact(str(path))
        log_optuna_plots(study, spec)
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        tracking.log_batch(parent_id, metrics={"trials/complete": states["COMPLETE"], "trials/pruned": states["PRUNED"],
                                               "trials/failed": states["FAIL"]}, step=max(t.number for t in trials))
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if not completed:
            errors = [t.user_attrs.get(USER_ATTR_RUN_ID) for t in trials if t.state == TrialState.FAIL]
            first = ""
            for run_id in errors:
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    first = client.get_run(run_id).data.tags.get("error", "")
                if first:
                    break
            summary["error"] = (f"no trial of study {study.study_name!r} completed ({states['FAIL']} failed, "
                                f"{states['PRUNED']} pruned)" + (f"; first error: {first}" if first else ""))
            mlflow.set_tags({"best_trial": "none: no trial completed", "error": summary["error"][:5000]})
            study.set_user_attr(STUDY_ATTR_SUMMARY, {"finished": finished, "parent": parent_id, "best_trial": None})
            mlflow.end_run("FAILED")
            return summary
        best = study.best_trial
        best_run_id = best.user_attrs.get(USER_ATTR_RUN_ID, "")
        children = {r.info.run_id for r in client.search_runs(
            [active.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            max_results=10000)}
        for other in completed:
            other_run = other.user_attrs.get(USER_ATTR_RUN_ID)
            if other_run in children:
                client.set_tag(other_run, "best_trial", "true" if other_run == best_run_id else "false")
        mlflow.set_tags({"best_trial": str(best.number), "best_run_id": best_run_id})
        tracking.log_batch(parent_id, metrics={f"best/{spec.metric}": best.value},
                           params={f"best.{k}": v for k, v in best.params.items()})
        # The one test evaluation: the best trial's configuration, refitted (features from the cache).
        config = spec.trial_config(best.params)
        prepared = prepare(config, progress=progress)
        result = fit_head(prepared, config)
        test_metrics, confusion = evaluate_test_split(prepared, result.head)
        result.metrics.update(test_metrics)
        result.confusion = confusion
        tracking.log_batch(parent_id, metrics={**test_metrics, "best/val/acc_refit": result.metrics["val/acc"]})
        tracking.log_figure(tracking.confusion_figure(confusion, prepared.dataset.classes,
                                                      f"{spec.study}: best trial #{best.number}, test"),
                            "plots/confusion_matrix.png")
        if result.history:
            tracking.log_figure(tracking.curves_figure(result.history, f"best trial #{best.number}"), "plots/curves.png")
        mlflow.log_dict(config.as_dict(), "best_config.yaml")
        # The UI shows the first lines of a description: the result first, then how it was obtained.
        description = (f"Best trial #{best.number}: {spec.metric} = {best.value:.4f} with "
                       + ", ".join(f"{k}={v}" for k, v in best.params.items())
                       + f"; test/acc = {test_metrics['test/acc']:.4f} (computed once, for this trial)\n\n"
                       f"{spec.description}\n\nStudy `{study.study_name}` from `{spec.path}`\n\n"
                       f"Command: `{tracking.command_line()}`")
        mlflow.set_tag("mlflow.note.content", description)
        summary.update({"best_trial": best.number, "best_params": best.params, "best_value": best.value,
                        "best_run_id": best_run_id, "test_acc": test_metrics["test/acc"], "result": result})
        version = previous.get("registered_version") if previous.get("best_trial") == best.number else None
        if register and spec.register and version is None:
            from .registry import register_result

            version = register_result(parent_id, result, spec.register, extra_tags={
                "study": study.study_name, "trial_number": str(best.number), "trial_run_id": best_run_id})
            summary["model_version"] = version
        study.set_user_attr(STUDY_ATTR_SUMMARY, {"finished": finished, "parent": parent_id, "best_trial": best.number,
                                                 "registered_version": version})
    return summary


def log_optuna_plots(study: optuna.Study, spec: StudySpec) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts; a plot that needs more trials is skipped."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = {"optimization_history": oplt.plot_optimization_history,
             "parallel_coordinate": oplt.plot_parallel_coordinate, "slice": oplt.plot_slice}
    if len(finished) >= 2:
        plots["param_importances"] = oplt.plot_param_importances
    if len(spec.space) == 2:
        plots["contour"] = oplt.plot_contour
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = oplt.plot_intermediate_values
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as error:
                mlflow.set_tag(f"plot.{name}", f"skipped: {error}"[:250])
                continue
            first = np.ravel(axes)[0] if isinstance(axes, np.ndarray) else axes
            figure = first.get_figure()
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            figure.tight_layout()
            tracking.log_figure(figure, f"plots/optuna_{name}.png")
            logged.append(name)
    plt.close("all")
    return logged


def summary_lines(summary: dict, spec: StudySpec) -> list[str]:
    """What a sweep prints: the study's trials, then its best trial (or who will summarise)."""
    states = ", ".join(f"{k.lower()}={v}" for k, v in summary["states"].items() if v)
    lines = [f"study {summary['study']}: {summary['trials']} trials ({states}), {summary['ran_here']} run by "
             f"this worker; parent run {summary['parent_run_id']}"]
    if not summary["summarised"]:
        lines.append("another worker is still running trials of this study: it summarises the study "
                     "(best trial, test accuracy, registered model) when they end")
    if "best_trial" in summary:
        params = ", ".join(f"{k}={v}" for k, v in summary["best_params"].items())
        lines.append(f"best trial #{summary['best_trial']}: {spec.metric}={summary['best_value']:.4f} ({params}); "
                     f"test/acc={summary['test_acc']:.4f}")
        if summary.get("model_version"):
            lines.append(f"registered {spec.register} version {summary['model_version']} (alias @challenger)")
    return lines
