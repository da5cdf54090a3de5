"""What the sweep tests share: the stores a test's sweeps wrote to, and how a user runs a sweep."""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from scenesweep.search.optuna_storage import default_storage

from helpers import run_cli, wait_until


def all_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def parents_and_children():
    runs = all_runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    return parents, children


def load(study_name="sweep_svm"):
    return optuna.load_study(study_name=study_name, storage=default_storage())


def sweep(study_file, *args, **kwargs):
    return run_cli("sweep", str(study_file), "--no-progress", *args, **kwargs)


def study_file(folder: Path, data: Path, study: str = "tiny", tunes: str = "svm", fixed: dict | None = None,
               space: dict | None = None, cache: Path | None = None, **keys) -> Path:
    """The tests' one writer of study files: a small study on ``data`` (10 training images a
    class, features cached in ``cache`` (default ``folder/cache``), nothing registered), the given
    ``fixed`` settings, ``space`` (default: C) and any other top-level keys (``n_trials``,
    ``pruner``, ``enqueue``, ``objectives``, ...) on top. A key set to None is left out (a fixed
    one too), as is a fixed setting the space searches. Returns the file, ``folder/<study>.yaml``."""
    space = space or {"C": {"type": "float", "low": 0.01, "high": 10.0, "log": True}}
    fixed = {"data": str(data), "train_per_class": 10, "cache_dir": str(cache or folder / "cache"), **(fixed or {})}
    raw = {"study": study, "experiment": keys.pop("experiment", study), "tunes": tunes,
           "fixed": {k: v for k, v in fixed.items() if v is not None and k not in space},
           "space": space, "n_trials": 2, "register": "", **keys}
    raw = {k: v for k, v in raw.items() if v is not None}  # n_trials=None: the file gives none
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_study(tmp_path, text, name="study.yaml"):
    """A study file written as given (for the files a test means to be odd or invalid; a valid
    small study: ``study_file``)."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def wait_for_running_trial(study_name: str, number: int = 0, timeout: float = 300):
    """Trial ``number`` of the study RUNNING with its MLflow run started (the moment a test
    kills or interrupts its worker); the test fails if it never gets there."""
    def running():
        try:
            trials = load(study_name).trials
        except KeyError:  # the study is not created yet
            return None
        trial = trials[number] if len(trials) > number else None
        return trial if trial is not None and trial.state.name == "RUNNING" and "mlflow_run_id" in trial.user_attrs \
            else None

    return wait_until(running, timeout, f"trial {number} of {study_name} never started")
