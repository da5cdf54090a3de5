"""What the sweep tests share: the stores a test's sweeps wrote to, and how a user runs a sweep."""
from __future__ import annotations

import textwrap

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from scenesweep.search.optuna_storage import default_storage

from conftest import run_cli


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


def write_study(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


