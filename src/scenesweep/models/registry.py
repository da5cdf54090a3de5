"""The MLflow model registry: register a run's servable model, promote a champion.

Stages are deprecated in MLflow 3: promotion moves the alias ``champion``; a new version gets
``challenger`` when it is at least as good on the objective as the challenger before. Each
version is an MLflow 3 model record (``models:/m-<id>``) whose source is the run the model
comes from, with that run's configuration as params and exactly its validation and test
metrics linked (``MODEL_METRICS``); the version also carries validation and test accuracy as
tags. (``search_model_versions`` returns empty aliases on SQLite: aliases are read with
``get_registered_model``.)

Promotion (``models.promotion``) moves ``champion``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time

from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ..core import faults
from ..tracking.sink import param_value
from .logged import log_image_classifier


CHAMPION, CHALLENGER = "champion", "challenger"
# The metrics that describe a registered model, linked to its record by model_id: the selection
# (validation) and the one test evaluation of the very head it serves; whether higher is better.
RECORD_METRICS = {"val/acc": True, "val/loss": False, "test/acc": True, "test/loss": False, "test/f1_macro": True,
                  "test/acc_balanced": True}
MODEL_METRICS = tuple(RECORD_METRICS)
# Version tags set at registration, and whether higher is better.
TAG_METRICS = {"val_acc": True, "test_acc": True, "val_loss": False}
PROMOTION_METRICS = {**RECORD_METRICS, **TAG_METRICS}
MODEL_DESCRIPTION = ("Transfer-learning image classifier (scenesweep). Input: a column `image` of "
                     "base64-encoded image file bytes. Output per image: `label`, `class_index` and "
                     "`score_<class>` per class. Serve: `mlflow models serve -m models:/{name}@champion "
                     "--env-manager local`")


def find_version(client: MlflowClient, model_name: str, tags: dict[str, str]):
    """The version of ``model_name`` whose tags hold ``tags`` (the newest), or None."""
    try:
        versions = client.search_model_versions(f"name={quoted(model_name)}")
    except MlflowException:
        return None  # no such registered model yet
    found = [v for v in versions if all(v.tags.get(k) == str(value) for k, value in tags.items())]
    return max(found, key=lambda v: int(v.version)) if found else None


def model_record_name(model_name: str, config, study: str | None = None) -> str:
    """What a model record is called: 'scene-classifier-svm_c-svm-pool5' for study svm_c's model
    (two studies' records read apart in the Models tab), 'scene-classifier-svm-pool5' for a single run's."""
    return "-".join(part for part in (model_name, study, config.head, config.layer) if part)


# What a version row carries (the registered model page shows every tag in it): what a user
# filters or promotes by and the ids that find its runs and record. The configuration is on the
# record (its params) and in the version's description; the model's URI is the version's source.
VERSION_TAGS = ("run_id", "parent_run_id", "study", "trial_number", "dataset_fingerprint", "val_acc", "val_loss",
                "test_acc", "model_id")


def _move_challenger(client: MlflowClient, model_name: str, version: str, tags: dict[str, str],
                     objective: tuple[str, str]) -> str | None:
    """Move ``challenger`` to ``version`` when it is at least as good on the objective as the
    version that holds the alias (or none does, or that one was evaluated on other data); else
    leave it, and say why in one line (returned)."""
    metric, direction = objective
    tag, higher = metric.replace("/", "_"), direction == "maximize"
    aliases = client.get_registered_model(model_name).aliases
    current = str(aliases[CHALLENGER]) if CHALLENGER in aliases else None
    previous = None
    if current is not None and current != str(version):
        with contextlib.suppress(MlflowException):
            previous = client.get_model_version(model_name, current)
    old, new = (version_tag_value(previous, tag) if previous else None), version_tag_value(SimpleVersion(tags), tag)
    comparable = previous is not None and previous.tags.get("dataset_fingerprint") == tags.get("dataset_fingerprint")
    if comparable and old is not None and new is not None and (new < old if higher else new > old):
        return (f"@{CHALLENGER} stays on version {current} of {model_name} ({tag}={old:.4f}): the new version "
                f"{version} ({tag}={new:.4f}) is worse on the objective")
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return None


def link_record(client: MlflowClient, model_id: str, model_name: str, version: str, source_run_id: str,
                step: int) -> None:
    """MLflow's own links between a model record and its versions, as ``mlflow.register_model``
    makes them: the record's ``mlflow.modelVersions`` tag lists its versions (the UI's logged
    model page shows them, not "Not registered"; the experiment's Models tab its registered
    models), and the record is an output of the run it came from (the run page's "Logged
    models"). Idempotent: a resume adds nothing twice."""
    record = client.get_logged_model(model_id)
    listed = json.loads(record.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": model_name, "version": str(version)}
    if entry not in [{"name": e.get("name"), "version": str(e.get("version"))} for e in listed]:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})
    outputs = client.get_run(source_run_id).outputs
    if model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
        client.log_outputs(source_run_id, [LoggedModelOutput(model_id=model_id, step=step)])


def challenger_text(model_name: str, version: str) -> str:
    """'(alias @challenger)' when the version holds it, else '(@challenger stays on version N)':
    what registering did, as a sweep prints it."""
    holder = MlflowClient().get_registered_model(model_name).aliases.get(CHALLENGER)
    if str(holder) == str(version):
        return f"(alias @{CHALLENGER})"
    return f"(@{CHALLENGER} stays on version {holder})" if holder is not None else f"(no @{CHALLENGER})"


@dataclasses.dataclass
class SimpleVersion:
    """Tags alone, read as a version's (``_metric``)."""

    tags: dict[str, str]


def register_result(run_id: str, result, model_name: str, extra_tags: dict[str, str] | None = None,
                    source_run_id: str | None = None, objective: tuple[str, str] = ("val/acc", "maximize")) -> str:
    """Record the servable image classifier of ``result`` and register it as a new version.

    The model record's source is ``source_run_id`` (a study's best trial; default ``run_id``), its
    params are that configuration's, and exactly ``MODEL_METRICS`` and ``model/size_mb`` are linked
    to it (``model_id``), nothing of a parent's history. The version (its run the source run) is
    tagged with ``VERSION_TAGS`` only, its configuration in its description; it gets ``challenger``
    unless worse on ``objective`` than the challenger's (a note says so); ``promote`` moves ``champion``.

    Args:
        run_id: the run that registers (a single run, or a study's parent).
        result: a fitted RunResult; ``result.metrics`` has val/acc, val/loss and, for the final
            model, the test metrics.
        model_name: registered model name, e.g. "scene-classifier".
        extra_tags: more version tags, e.g. ``{"study": ..., "trial_number": ...}``.
        source_run_id: the run the model comes from (default ``run_id``).
        objective: (metric, direction) the challenger is compared on: a study's objective.

    Returns:
        The version number, as a string.
    """
    client = MlflowClient()
    source_run_id = source_run_id or run_id
    config = result.prepared.config
    # A study's version is made once: a resume that finds it (its process was killed after the
    # version was written) completes its description and alias instead of registering again.
    # The run that registers: the parent of a study (``parent_run_id``), else the run itself;
    # ``run_id`` is always the run the model comes from, as the version's own source run.
    registering = {"parent_run_id": run_id} if run_id != source_run_id else {"run_id": run_id}
    identity = {**registering, **{k: v for k, v in (extra_tags or {}).items() if k in ("study", "trial_number")}}
    existing = find_version(client, model_name, identity) if len(identity) > 1 else None
    if existing:
        model_uri, model_id = existing.source, existing.tags.get("model_id")
    else:
        model_uri, model_id = _record(client, result, model_name, source_run_id, extra_tags or {})
    tags = _version_tags(result, {"run_id": source_run_id, **registering, "model_id": model_id or "",
                                  **(extra_tags or {})})
    if existing:
        version = existing.version
    else:
        with contextlib.suppress(MlflowException):  # registered before (or by a worker at this moment)
            client.create_registered_model(model_name)
        version = client.create_model_version(model_name, model_uri, run_id=source_run_id, tags=tags,
                                              model_id=model_id).version
    faults.moment("version-registered")
    if model_id:
        link_record(client, model_id, model_name, str(version), source_run_id, len(result.history))
    if not client.get_registered_model(model_name).description:
        client.update_registered_model(model_name, description=MODEL_DESCRIPTION.format(name=model_name))
    client.update_model_version(model_name, version, description=_version_description(config, tags, run_id, model_uri))
    kept = _move_challenger(client, model_name, str(version), tags, objective)
    if kept:
        print(f"note: {kept}", file=sys.stderr)

    for run in {run_id, source_run_id}:
        client.set_tag(run, "registered_model", model_name)
        client.set_tag(run, "registered_version", str(version))
    return str(version)


def _record(client: MlflowClient, result, model_name: str, source_run_id: str,
            extra_tags: dict[str, str]) -> tuple[str, str]:
    """The model record of ``result`` (its params the configuration, as the run's), and exactly
    its validation and test metrics linked to it: (model URI, model id)."""
    config, metrics = result.prepared.config, result.metrics
    params = {k: param_value(v) for k, v in {**config.values, "head": config.head}.items()}
    logged = log_image_classifier(result, name=model_record_name(model_name, config, extra_tags.get("study")),
                                  source_run_id=source_run_id, params=params,
                                  tags={"registered_model": model_name, **extra_tags,
                                        "dataset_fingerprint": result.prepared.dataset.fingerprint})
    # Linked at the run's final step (an mlp head's last epoch), as MLflow's own log_model links a
    # run's metrics: the same values again, with the model's id.
    now, step = int(time.time() * 1000), len(result.history)
    linked = {k: metrics[k] for k in MODEL_METRICS if k in metrics and math.isfinite(metrics[k])}
    client.log_batch(source_run_id, metrics=[Metric(k, float(v), now, step, model_id=logged.model_id) for k, v in
                                             {**linked, "model/size_mb": logged.size_mb}.items()])
    return logged.model_uri, logged.model_id


def _version_tags(result, ids: dict[str, str]) -> dict[str, str]:
    """``VERSION_TAGS`` of a version: ``ids`` (runs, study, trial, model id: MLflow's SQL registry
    keeps no model_id column, so the record's id travels as a tag), the dataset and the scores."""
    metrics = result.metrics
    tags = {**ids, "dataset_fingerprint": result.prepared.dataset.fingerprint,
            "val_acc": f"{metrics['val/acc']:.6f}", "val_loss": f"{metrics['val/loss']:.6f}"}
    if "test/acc" in metrics:
        tags["test_acc"] = f"{metrics['test/acc']:.6f}"
    return {k: v for k, v in tags.items() if k in VERSION_TAGS}


def _version_description(config, tags: dict[str, str], run_id: str, model_uri: str) -> str:
    """Where the version came from, what it is, its scores, and its whole configuration."""
    where = (f"study {tags['study']} trial #{tags['trial_number']}" if "study" in tags and "trial_number" in tags
             else f"run {run_id}")
    scores = ", ".join(f"{k}={tags[k]}" for k in ("val_acc", "test_acc") if k in tags)
    return (f"{where}: {config.head} head on {config.arch} {config.layer} ({config.pooling} pooling, "
            f"{config.image_size} px); {scores}.\n\nModel record `{model_uri}` (its params: the whole "
            "configuration). Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(config.values.items())))


def version_tag_value(version, metric: str) -> float | None:
    raw = version.tags.get(metric)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def quoted(text: str) -> str:
    """A string literal of MLflow's filter language (no escapes: either quote, whichever is absent)."""
    return f'"{text}"' if "'" in text else f"'{text}'"


