"""The MLflow model registry: register a run's servable model, promote a champion.

Stages are deprecated in MLflow 3: promotion moves the alias ``champion``; a new version gets
``challenger`` when it is at least as good on the objective as the challenger before. Each
version is an MLflow 3 model record (``models:/m-<id>``) whose source is the run the model
comes from, with that run's configuration as params and exactly its validation and test
metrics linked (``MODEL_METRICS``); the version also carries validation and test accuracy as
tags. (``search_model_versions`` returns empty aliases on SQLite: aliases are read with
``get_registered_model``.)

Promotion ranks versions by a metric of their model records (``val/acc``, ``test/acc``, ...:
``mlflow.search_logged_models`` over every experiment, so the champion can be the best model of
several studies, optionally narrowed by a filter such as ``params.layer = 'relu7'``), or by a
version tag (``val_acc``, ``test_acc``, ``val_loss``). Rules, in order:
  1. the candidate is ``--version`` when given, else the version with the best metric (ties go
     to the newest);
  2. no champion yet, or a champion without the metric: the candidate is promoted;
  3. otherwise the candidate must beat the champion strictly, and have been evaluated on the same
     dataset (same ``dataset_fingerprint`` tag): accuracies on different data do not compare;
  4. ``force`` promotes the candidate whatever 3 says.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time

import mlflow
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from ..core import faults
from ..core.errors import ConfigError, first_line
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
        versions = client.search_model_versions(f"name={_quoted(model_name)}")
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
    old, new = (_metric(previous, tag) if previous else None), _metric(SimpleVersion(tags), tag)
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
    to it (``model_id``), nothing of a parent's history. The version (``model_id`` set, its run the
    source run) is tagged with ``VERSION_TAGS`` only (runs, study and trial, dataset fingerprint,
    validation and test scores); the configuration is in its description; it gets the alias ``challenger``
    unless it is worse on ``objective`` than the challenger's version (a note on stderr says so).
    The champion is left alone: ``promote`` moves it.

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
    config, metrics = result.prepared.config, result.metrics
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
        params = {k: param_value(v) for k, v in {**config.values, "head": config.head}.items()}  # as the run's
        name = model_record_name(model_name, config, (extra_tags or {}).get("study"))
        logged = log_image_classifier(result, name=name, source_run_id=source_run_id,
                                      params=params, tags={"registered_model": model_name, **(extra_tags or {}),
                                                           "dataset_fingerprint": result.prepared.dataset.fingerprint})
        model_uri, model_id = logged.model_uri, logged.model_id
        # Linked at the run's final step (an mlp head's last epoch), as MLflow's own log_model links a
        # run's metrics: the same values again, with the model's id.
        now, step = int(time.time() * 1000), len(result.history)
        linked = {k: metrics[k] for k in MODEL_METRICS if k in metrics and math.isfinite(metrics[k])}
        client.log_batch(source_run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in
                                                 {**linked, "model/size_mb": logged.size_mb}.items()])
    tags = {"run_id": source_run_id, **registering, "dataset_fingerprint": result.prepared.dataset.fingerprint,
            "val_acc": f"{metrics['val/acc']:.6f}", "val_loss": f"{metrics['val/loss']:.6f}",
            # MLflow's SQL registry keeps no model_id column (get_model_version(...).model_id is None on
            # SQLite and PostgreSQL): the record's id travels as a tag too.
            "model_id": model_id or "", **(extra_tags or {})}
    if "test/acc" in metrics:
        tags["test_acc"] = f"{metrics['test/acc']:.6f}"
    tags = {k: v for k, v in tags.items() if k in VERSION_TAGS}
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
    where = (f"study {tags['study']} trial #{tags['trial_number']}" if "study" in tags and "trial_number" in tags
             else f"run {run_id}")
    scores = ", ".join(f"{k}={tags[k]}" for k in ("val_acc", "test_acc") if k in tags)
    client.update_model_version(model_name, version, description=(
        f"{where}: {config.head} head on {config.arch} {config.layer} ({config.pooling} pooling, "
        f"{config.image_size} px); {scores}.\n\nModel record `{model_uri}` (its params: the whole "
        f"configuration). Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(config.values.items()))))
    kept = _move_challenger(client, model_name, str(version), tags, objective)
    if kept:
        print(f"note: {kept}", file=sys.stderr)

    for run in {run_id, source_run_id}:
        client.set_tag(run, "registered_model", model_name)
        client.set_tag(run, "registered_version", str(version))
    return str(version)


@dataclasses.dataclass
class Promotion:
    """What ``promote`` did and why.

    Attributes:
        model: registered model name.
        metric: the version tag compared.
        promoted: whether the alias moved.
        version: the candidate version.
        previous: the champion before, or None.
        message: one line saying what was done and why.
    """

    model: str
    metric: str
    promoted: bool
    version: str
    previous: str | None
    message: str


def _metric(version, metric: str) -> float | None:
    raw = version.tags.get(metric)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _quoted(text: str) -> str:
    """A string literal of MLflow's filter language (no escapes: either quote, whichever is absent)."""
    return f'"{text}"' if "'" in text else f"'{text}'"


def _record_metric(record, metric: str) -> float | None:
    """The value of ``metric`` linked to a model record (the last step's, if several)."""
    linked = [m for m in record.metrics or [] if m.key == metric]
    return max(linked, key=lambda m: (m.step, m.timestamp)).value if linked else None


def _record_scores(client: MlflowClient, versions: dict, metric: str,
                   where: str | None) -> tuple[dict[str, float | None], set[str], int]:
    """Each version's ``metric`` as its model record holds it, read with ``search_logged_models``
    over every active experiment (a model's records live in the experiments of the runs it came
    from: several studies, several experiments), narrowed by the filter ``where``.

    Returns:
        (score per version number, the versions whose record matched ``where``, records searched).
    """
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    try:
        records = mlflow.search_logged_models(experiment_ids=experiment_ids, filter_string=where or None,
                                              output_format="list")
    except MlflowException as error:
        raise ConfigError(f"where={where!r}: not a model-record filter ({first_line(error)}); expected e.g. "
                          "\"params.layer = 'relu7'\" or \"tags.study = 'svm-scenes'\"") from None
    by_model: dict[str, list[str]] = {}
    for number, version in versions.items():
        model_id = version.tags.get("model_id") or getattr(version, "model_id", None)
        if model_id:
            by_model.setdefault(model_id, []).append(number)
    scores: dict[str, float | None] = {number: None for number in versions}
    matched: set[str] = set()
    for record in records:
        for number in by_model.get(record.model_id, []):
            scores[number] = _record_metric(record, metric)
            matched.add(number)
    for number in set(versions) - matched:  # outside the filter (the champion, say): still compared
        model_id = versions[number].tags.get("model_id")
        if model_id:
            with contextlib.suppress(MlflowException):
                scores[number] = _record_metric(client.get_logged_model(model_id), metric)
    return scores, matched, len(records)


def _candidate(model_name: str, versions: dict, scores: dict[str, float | None], metric: str,
               version: str | int | None, eligible: set[str] | None = None) -> str:
    """``version`` when given (it must exist), else the version with the best metric (ties: the
    newest) among ``eligible`` (default: all)."""
    if version is not None:
        candidate = str(version).strip()
        if candidate not in versions:
            raise ConfigError(f"version={version!r}: model {model_name!r} has no such version; versions: "
                              f"{', '.join(sorted(versions, key=int)) or 'none'}")
        return candidate
    scored = {number: value for number, value in scores.items()
              if value is not None and (eligible is None or number in eligible)}
    if not scored and metric in RECORD_METRICS:
        matching = " matching the filter" if eligible is not None else ""
        raise ConfigError(f"metric={metric!r}: no model record of {model_name!r}{matching} has a {metric} metric")
    if not scored:
        raise ConfigError(f"metric={metric!r}: no version of {model_name!r} carries a {metric} tag")
    sign = 1.0 if PROMOTION_METRICS[metric] else -1.0
    return max(scored, key=lambda n: (sign * scored[n], int(n)))


def _beats(versions: dict, scores: dict[str, float | None], metric: str, candidate: str,
           current: str | None) -> tuple[bool, str]:
    """(whether the candidate replaces the champion, why): rules 2 and 3 of the module docstring."""
    value, current_value = scores.get(candidate), scores.get(current) if current else None
    data_now = versions[current].tags.get("dataset_fingerprint") if current in versions else None
    data_new = versions[candidate].tags.get("dataset_fingerprint")
    if current is None or current not in versions:
        return True, f"no @{CHAMPION} before"
    if current_value is None:
        return True, f"the @{CHAMPION}, version {current}, carries no {metric}"
    if data_now and data_new and data_now != data_new:
        return False, (f"it was evaluated on another dataset (fingerprint {data_new[:12]}) than the "
                       f"@{CHAMPION}, version {current} ({data_now[:12]}), so their {metric} do not compare")
    if value is None:
        return False, f"it carries no {metric}"
    better = value > current_value if PROMOTION_METRICS[metric] else value < current_value
    relation = "beats" if better else ("ties" if value == current_value else "does not beat")
    return better, f"it {relation} version {current} ({metric}={current_value:.4f})"


def promote(model_name: str, metric: str = "val/acc", force: bool = False, version: str | int | None = None,
            where: str | None = None) -> Promotion:
    """Move ``champion`` to the best version by ``metric`` if it beats the current champion.

    Args:
        model_name: registered model name.
        metric: a model-record metric (``RECORD_METRICS``: read with ``search_logged_models``) or
            a version tag (``TAG_METRICS``).
        force: move the alias even when the candidate does not beat the champion.
        version: promote this version instead of the best one (same rules unless forced).
        where: with a record metric, only versions whose record matches this
            ``search_logged_models`` filter are candidates, e.g. ``params.layer = 'relu7'`` or ``tags.study IN ('a', 'b')``.

    Returns:
        A Promotion saying what was done and why.

    Raises:
        ConfigError: an unknown model name, metric or version, a bad filter, or no version
            carrying the metric.
    """
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"metric={metric!r}: expected one of {', '.join(PROMOTION_METRICS)}")
    if where and metric not in RECORD_METRICS:
        raise ConfigError(f"where={where!r}: filters model records; use it with a record metric "
                          f"({', '.join(RECORD_METRICS)}), not the version tag {metric!r}")
    client = MlflowClient()
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(f"model {model_name!r} is not registered; registered models: "
                          f"{', '.join(names) or 'none'}") from None
    versions = {str(v.version): v for v in client.search_model_versions(f"name={_quoted(model_name)}")}
    eligible, searched = None, ""
    if metric in RECORD_METRICS:
        scores, matched, found = _record_scores(client, versions, metric, where)
        eligible = matched if where else None
        searched = (f"; {len(matched)} of {found} model record(s) matching {where!r} are versions of {model_name}"
                    if where else "")
    else:
        scores = {number: _metric(v, metric) for number, v in versions.items()}
    candidate = _candidate(model_name, versions, scores, metric, version, eligible)

    # Alias values come back as int on SQLite: version numbers are compared as strings here.
    current = str(registered.aliases[CHAMPION]) if CHAMPION in registered.aliases else None
    value = scores.get(candidate)
    shown = f"{metric}={value:.4f}" if value is not None else f"no {metric}"
    if current == candidate:
        return Promotion(model_name, metric, False, candidate, current,
                         f"version {candidate} ({shown}) is already the @{CHAMPION} of {model_name}: "
                         f"nothing to do{searched}")

    beats, why = _beats(versions, scores, metric, candidate, current)
    if not beats and not force:
        return Promotion(model_name, metric, False, candidate, current,
                         f"kept version {current} as @{CHAMPION} of {model_name}: candidate version {candidate} "
                         f"({shown}) was not promoted because {why}; use --force to promote it anyway{searched}")
    client.set_registered_model_alias(model_name, CHAMPION, candidate)
    if not beats:
        why = f"forced, although {why}"
    return Promotion(model_name, metric, True, candidate, current,
                     f"promoted version {candidate} of {model_name} to @{CHAMPION} ({shown}): {why}{searched}")
