"""A study's one parent MLflow run: found from the study, or created by its first worker.

The study records its parent's run id (user attribute ``mlflow_parent_run_id``); every later
worker, on this machine or another, and every resume attaches its trials to that run. Under
``mlflow run`` the project's run (MLFLOW_RUN_ID) becomes the parent of a new study; when the
study has its parent already, the project's run becomes a ``sweep=worker`` run pointing to it.

The parent logs the study's setting as resolved (every run parameter that is not searched, e.g.
``data``, ``weights``, ``image_size``): under ``mlflow run``, whose own params hold the
MLproject's values as typed (``''`` for "the study file's"), a value that differs goes under
``resolved.<name>``, as for single runs.
"""
from __future__ import annotations

import contextlib
import os
import socket

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from ..compute.hardware import resolve_device
from ..core import faults
from ..core.store_urls import redact
from ..search.optuna_internals import study_id
from ..specs.studies import Dimension, StudySpec
from ..tracking import lifecycle, mlflow_store, provenance, sink

STUDY_ATTR_PARENT = "mlflow_parent_run_id"


def describe_dimension(dim: Dimension) -> str:
    """'{max, avg}' or 'float[1e-05, 100] log': a search-space dimension as a parameter value."""
    if dim.type == "categorical":
        return "{" + ", ".join(map(str, dim.choices)) + "}"
    return f"{dim.type}[{dim.low:g}, {dim.high:g}]" + (" log" if dim.log else "")


def recorded_parent(study: optuna.Study):
    """The parent run the study records, when it still exists (not deleted), else None."""
    recorded = study.user_attrs.get(STUDY_ATTR_PARENT)
    if not recorded:
        return None
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        parent = MlflowClient().get_run(recorded)
        return parent if parent.info.lifecycle_stage == "active" else None
    return None


def unrecorded_parent(study: optuna.Study, spec: StudySpec, storage_url: str):
    """A parent run of this study that the study does not record: its creator was killed between
    creating the run and recording it. Adopted rather than made again (one parent per study)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(spec.mlflow_experiment)
    if experiment is None or "'" in study.study_name:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=50, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.sweep = 'parent' and tags.study = '{study.study_name}'")
    storage = redact(storage_url)
    runs = [r for r in runs if r.data.tags.get("optuna.storage") == storage and r.info.lifecycle_stage == "active"
            and r.data.tags.get("optuna.study_id") == str(study_id(study))]
    return runs[0] if runs else None


def _tag_worker_run(run_id: str, study: optuna.Study, spec: StudySpec, parent_id: str) -> None:
    """``mlflow run``'s own run, when the study has its parent already: a pointer to it."""
    sink.log_batch(run_id, tags={
        "sweep": "worker", "study": study.study_name, "study_parent_run_id": parent_id,
        "mlflow.runName": f"{study.study_name} worker {socket.gethostname()}:{os.getpid()}",
        "mlflow.note.content": f"A worker of study `{study.study_name}`: its trials are nested under the "
                               f"study's parent run `{parent_id}`."})


def _create(study: optuna.Study, spec: StudySpec, storage_url: str) -> tuple[str, str]:
    """The new parent: ``mlflow run``'s run, or a new run in the study's experiment."""
    client = MlflowClient()
    tags = {"study": study.study_name, "study_file": str(spec.path), "optuna.storage": redact(storage_url),
            "optuna.study_id": str(study_id(study)),
            "entry_point": f"sweep:{spec.study}", "sweep": "parent", "mlflow.runName": f"{study.study_name} study",
            "mlflow.note.content": f"Study `{study.study_name}` from `{spec.path}`\n\n"
                                   f"Command: `{provenance.command_line()}`\n\n{spec.description_as_run}",
            # The machine of the worker that created it (each trial tags its own).
            **sink.hardware_tags(str(resolve_device(spec.base.device)))}
    launched = lifecycle.launched_run_id()
    if launched:
        run_id, experiment = launched, client.get_run(launched).info.experiment_id
        mlflow_store.warn_if_not_in_family(client.get_run(launched), spec.mlflow_experiment)
        lifecycle.adopt_run(run_id, tags)
    else:
        experiment = mlflow_store.experiment_id(spec.mlflow_experiment)
        run_id = lifecycle.create_run(experiment, tags["mlflow.runName"], {**provenance.source_tags(), **tags})
    if not client.get_experiment(experiment).tags.get("mlflow.note.content"):
        # The experiments list shows it in its Description column.
        client.set_experiment_tag(experiment, "mlflow.note.content", spec.description_as_run)
    setting = {k: v for k, v in spec.base.values.items() if k not in spec.space}
    sink.log_batch(run_id, params={**setting, "study_name": study.study_name, "tunes": spec.tunes,
                                   "objective": f"{spec.direction} {spec.metric}",
                                   **({"objectives": ", ".join(f"{g.direction} {g.metric}" for g in spec.goals)}
                                      if spec.multi_objective else {}),
                                   **({"constraints": "; ".join(map(str, spec.constraints))} if spec.constraints else {}),
                                   **({"select": f"{spec.select.direction} {spec.select.metric}"
                                                 + (f" where {spec.select.where}" if spec.select.where else "")}
                                      if spec.select else {}),
                                   **({"validation": f"{spec.folds}-fold"} if spec.folds else {}),
                                   "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
                                   **{f"fixed.{k}": v for k, v in spec.fixed.items()},
                                   **{f"space.{k}": describe_dimension(d) for k, d in spec.space.items()}})
    client.log_artifact(run_id, str(spec.path), "study")
    return run_id, experiment


def attach_parent(study: optuna.Study, spec: StudySpec, storage_url: str, lock) -> tuple[str, str, bool]:
    """The study's parent run (reopened when a resume finds it ended), or a new one.

    Args:
        study, spec, storage_url: the study, its file and where it is stored.
        lock: the study lock (two workers starting together create one parent between them).

    Returns:
        (parent run id, its experiment id, whether this worker created it).
    """
    with lock:
        parent = recorded_parent(study)
        if parent is None:
            parent = unrecorded_parent(study, spec, storage_url)
            if parent is not None:
                study.set_user_attr(STUDY_ATTR_PARENT, parent.info.run_id)
        if parent is None:
            run_id, experiment = _create(study, spec, storage_url)
            faults.moment("parent-created")
            study.set_user_attr(STUDY_ATTR_PARENT, run_id)
            return run_id, experiment, True
    if parent.info.status != lifecycle.Status.RUNNING:
        # Resumed: its name says no result until the summary names the new best.
        lifecycle.reopen_run(parent.info.run_id, f"{study.study_name} study")
    launched = lifecycle.launched_run_id()
    if launched and launched != parent.info.run_id:
        _tag_worker_run(launched, study, spec, parent.info.run_id)
    return parent.info.run_id, parent.info.experiment_id, False
