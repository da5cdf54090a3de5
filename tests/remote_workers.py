"""What the several-machines tests share: workers as ``scenesweep sweep`` processes pointed at the
shared services (PostgreSQL for Optuna, an MLflow server), their small study files, and reading
the study and the runs back from those services."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from helpers import REPO, wait_until
from sweep_helpers import study_file
from warm_processes import WarmPopen

# The smallest setting that still runs a real backbone: ResNet-18's pool features at 32 px.
SMALLEST = {"arch": "resnet18", "layer": "pool", "image_size": 32}


def password(services) -> str:
    return urllib.parse.urlsplit(services.storage_url).password


def fresh_schema(services) -> str:
    """A new, empty schema in the optuna database, and the storage URL that uses it: for the
    workers, a database that has never seen Optuna (its tables are created by whoever comes first)."""
    schema = f"fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.storage_url, connect_timeout=10, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    return f"{services.storage_url}?options={urllib.parse.quote(f'-csearch_path={schema}')}"


def svm_study(tmp_path, flat_scenes, name, n_trials, register=""):
    return study_file(tmp_path, flat_scenes, name, "svm", fixed=SMALLEST,
                      space={"C": {"type": "float", "low": 1.0e-3, "high": 1.0e2, "log": True}},
                      sampler={"name": "tpe", "seed": 0}, n_trials=n_trials, register=register)


def mlp_study(tmp_path, flat_scenes, name, n_trials, epochs):
    """Trials long enough to be killed in the middle of one (``epochs`` of a 64-wide head)."""
    return study_file(tmp_path, flat_scenes, name, "mlp", fixed={**SMALLEST, "hidden": "64", "epochs": epochs},
                      space={"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}, n_trials=n_trials)


class Worker(WarmPopen):
    """A ``scenesweep sweep`` process whose output goes to files (pipes read one worker at a time
    could fill up and block a worker that holds the study lock)."""

    def __init__(self, command: list[str], env: dict, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = (logs / f"{uuid.uuid4().hex[:8]}.{n}" for n in ("out", "err"))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            super().__init__(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    def output(self) -> tuple[str, str]:
        return self.out_path.read_text(), self.err_path.read_text()


def start_workers(count: int, study: Path, *args: str, heartbeat: str = "30", env: dict | None = None) -> list[Worker]:
    command = [sys.executable, "-m", "scenesweep", "sweep", str(study), "--no-progress", "--heartbeat", heartbeat,
               *args]
    return [Worker(command, {**os.environ, **(env or {})}, study.parent / "logs") for _ in range(count)]


def finish(workers: list[Worker], timeout: float = 600) -> list[tuple[str, str]]:
    """Wait for every worker (all killed when one outlasts ``timeout``); their (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
            worker.wait()
        pytest.fail("workers still running after %d s; their stderr:\n" % timeout
                    + "\n".join(w.output()[1][-3000:] for w in workers))
    return [worker.output() for worker in workers]


@functools.lru_cache(maxsize=None)
def rdb(storage: str) -> optuna.storages.RDBStorage:
    """One storage (one small pool) per URL for the whole module: a new RDBStorage per poll would
    open connections faster than they are closed and exhaust PostgreSQL's max_connections."""
    return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True, "pool_size": 1,
                                                              "max_overflow": 1})


def load(name: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=rdb(storage))


def trials_of(name: str, storage: str) -> list:
    try:
        return load(name, storage).trials
    except KeyError:  # not created yet
        return []


def experiment_runs(name: str) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the server"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def parent_and_children(name: str):
    runs = experiment_runs(name)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    return runs, parents, children


def assert_no_password(services, runs, outputs=()) -> None:
    """The password is in no run tag, param or note, and in no line a worker printed."""
    secret = password(services)
    for run in runs:
        for kind, values in (("tag", run.data.tags), ("param", run.data.params)):
            leaked = [key for key, value in values.items() if secret in str(value) or secret in key]
            assert not leaked, f"run {run.info.run_name}: the password is in its {kind}(s) {leaked}"
    for out, err in outputs:
        leaked = [line for line in (out + err).splitlines() if secret in line]
        assert not leaked, f"a worker printed the password: {leaked[0].replace(secret, '***')}"


def assert_nothing_running(runs) -> None:
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def wait_for_running_trial(name: str, storage: str, pids: set[int], number: int | None = None,
                           timeout: float = 300):
    """A trial RUNNING (trial ``number``, else any) with its MLflow run, run by one of ``pids``."""
    def running():
        for trial in trials_of(name, storage):
            worker = trial.user_attrs.get("worker") or {}
            if (number is None or trial.number == number) and trial.state == TrialState.RUNNING \
                    and "mlflow_run_id" in trial.user_attrs and worker.get("pid") in pids:
                return trial
        return None

    return wait_until(running, timeout, f"no trial of {name} ran")
