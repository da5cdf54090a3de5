"""The MLflow model registry: register a run's servable model, promote a champion.

Stages are deprecated in MLflow 3: promotion moves the alias ``champion``; a new version gets
``challenger``. Versions carry their validation and test accuracy as tags, so promotion
compares versions without reopening runs. (``search_model_versions`` returns empty aliases on
SQLite: aliases are read with ``get_registered_model``.)

Promotion rules, in order:
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
import math
import time

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..core import faults
from ..core.errors import ConfigError
from ..tracking.sink import param_value
from .logged import log_image_classifier

CHAMPION, CHALLENGER = "champion", "challenger"
# Version tags that promotion can rank by, and whether higher is better.
PROMOTION_METRICS = {"val_acc": True, "test_acc": True, "val_loss": False}
MODEL_DESCRIPTION = ("VGG transfer-learning image classifier (scenesweep). Input: a column `image` of "
                     "base64-encoded image file bytes. Output per image: `label`, `class_index` and "
                     "`score_<class>` per class. Serve: `mlflow models serve -m models:/{name}@champion "
                     "--env-manager local`")


def find_version(client: MlflowClient, model_name: str, tags: dict[str, str]):
    """The version of ``model_name`` whose tags hold ``tags`` (the newest), or None."""
    quote = '"' if "'" in model_name else "'"
    try:
        versions = client.search_model_versions(f"name={quote}{model_name}{quote}")
    except MlflowException:
        return None  # no such registered model yet
    found = [v for v in versions if all(v.tags.get(k) == str(value) for k, value in tags.items())]
    return max(found, key=lambda v: int(v.version)) if found else None


# The metrics that describe a registered model, linked to its record by model_id: the selection
# (validation) and the one test evaluation of the very head it serves.
MODEL_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro", "test/acc_balanced")


def model_record_name(model_name: str, config) -> str:
    """What a model record is called: 'scene-classifier-svm-pool5'."""
    return f"{model_name}-{config.head}-{config.layer}"


def register_result(run_id: str, result, model_name: str, extra_tags: dict[str, str] | None = None,
                    source_run_id: str | None = None) -> str:
    """Record the servable image classifier of ``result`` and register it as a new version.

    The model record's source is ``source_run_id`` (a study's best trial; default ``run_id``), its
    params are that configuration's, and exactly ``MODEL_METRICS`` and ``model/size_mb`` are linked
    to it (``model_id``), nothing of a parent's history. The version (``model_id`` set, its run the
    source run) is tagged with the run, dataset fingerprint, validation and test accuracy, the
    feature settings (plus ``extra_tags``, e.g. study and trial) and gets the alias ``challenger``.
    The champion is left alone: ``promote`` moves it.

    Args:
        run_id: the run that registers (a single run, or a study's parent).
        result: a fitted RunResult; ``result.metrics`` has val/acc, val/loss and, for the final
            model, the test metrics.
        model_name: registered model name, e.g. "scene-classifier".
        extra_tags: more version tags, e.g. ``{"study": ..., "trial_number": ...}``.
        source_run_id: the run the model comes from (default ``run_id``).

    Returns:
        The version number, as a string.
    """
    client = MlflowClient()
    source_run_id = source_run_id or run_id
    config, metrics = result.prepared.config, result.metrics
    # A study's version is made once: a resume that finds it (its process was killed after the
    # version was written) completes its description and alias instead of registering again.
    identity = {"run_id": run_id, **{k: v for k, v in (extra_tags or {}).items() if k in ("study", "trial_number")}}
    existing = find_version(client, model_name, identity) if len(identity) > 1 else None
    if existing:
        model_uri, model_id = existing.tags.get("model_uri", existing.source), existing.tags.get("model_id")
    else:
        params = {k: param_value(v) for k, v in {**config.values, "head": config.head}.items()}  # as the run's
        logged = log_image_classifier(result, name=model_record_name(model_name, config), source_run_id=source_run_id,
                                      params=params, tags={"registered_model": model_name, **(extra_tags or {})})
        model_uri, model_id = logged.model_uri, logged.model_id
        # Linked at the run's final step (an mlp head's last epoch), as MLflow's own log_model links a
        # run's metrics: the same values again, with the model's id.
        now, step = int(time.time() * 1000), len(result.history)
        linked = {k: metrics[k] for k in MODEL_METRICS if k in metrics and math.isfinite(metrics[k])}
        client.log_batch(source_run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in
                                                 {**linked, "model/size_mb": logged.size_mb}.items()])
    tags = {"run_id": run_id, "model_uri": model_uri, "dataset_fingerprint": result.prepared.dataset.fingerprint,
            "val_acc": f"{metrics['val/acc']:.6f}", "val_loss": f"{metrics['val/loss']:.6f}",
            "head": config.head, "arch": config.arch, "layer": config.layer, "pooling": config.pooling,
            "fc_width": str(config.fc_width), "image_size": str(config.image_size), "data": str(config.data),
            "weights": str(config.weights), "source_run_id": source_run_id,
            # MLflow's SQL registry keeps no model_id column (get_model_version(...).model_id is None on
            # SQLite and PostgreSQL): the record's id travels as a tag too.
            "model_id": model_id or "", **(extra_tags or {})}
    if "test/acc" in metrics:
        tags["test_acc"] = f"{metrics['test/acc']:.6f}"
    if existing:
        version = existing.version
    else:
        with contextlib.suppress(MlflowException):  # registered before (or by a worker at this moment)
            client.create_registered_model(model_name)
        version = client.create_model_version(model_name, model_uri, run_id=source_run_id, tags=tags,
                                              model_id=model_id).version
    faults.moment("version-registered")
    if not client.get_registered_model(model_name).description:
        client.update_registered_model(model_name, description=MODEL_DESCRIPTION.format(name=model_name))
    where = (f"study {tags['study']} trial #{tags['trial_number']}" if "study" in tags and "trial_number" in tags
             else f"run {run_id}")
    scores = ", ".join(f"{k}={tags[k]}" for k in ("val_acc", "test_acc") if k in tags)
    client.update_model_version(model_name, version, description=(
        f"{where}: {config.head} head on {config.arch} {config.layer} ({config.pooling} pooling, "
        f"{config.image_size} px); {scores}"))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
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


def _candidate(model_name: str, versions: dict, scores: dict[str, float | None], metric: str,
               version: str | int | None) -> str:
    """``version`` when given (it must exist), else the version with the best metric (ties: the newest)."""
    if version is not None:
        candidate = str(version).strip()
        if candidate not in versions:
            raise ConfigError(f"version={version!r}: model {model_name!r} has no such version; versions: "
                              f"{', '.join(sorted(versions, key=int)) or 'none'}")
        return candidate
    scored = {number: value for number, value in scores.items() if value is not None}
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


def promote(model_name: str, metric: str = "val_acc", force: bool = False, version: str | int | None = None) -> Promotion:
    """Move ``champion`` to the best version by ``metric`` if it beats the current champion.

    Args:
        model_name: registered model name.
        metric: a version tag from ``PROMOTION_METRICS``.
        force: move the alias even when the candidate does not beat the champion.
        version: promote this version instead of the best one (same rules unless forced).

    Returns:
        A Promotion saying what was done and why.

    Raises:
        ConfigError: an unknown model name, metric or version, or no version carrying the metric.
    """
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"metric={metric!r}: expected one of {', '.join(PROMOTION_METRICS)}")
    client = MlflowClient()
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(f"model {model_name!r} is not registered; registered models: "
                          f"{', '.join(names) or 'none'}") from None
    quote = '"' if "'" in model_name else "'"  # the filter language has no escapes; it takes either quote
    versions = {str(v.version): v for v in client.search_model_versions(f"name={quote}{model_name}{quote}")}
    scores = {number: _metric(v, metric) for number, v in versions.items()}
    candidate = _candidate(model_name, versions, scores, metric, version)

    # Alias values come back as int on SQLite: version numbers are compared as strings here.
    current = str(registered.aliases[CHAMPION]) if CHAMPION in registered.aliases else None
    value = scores.get(candidate)
    shown = f"{metric}={value:.4f}" if value is not None else f"no {metric}"
    if current == candidate:
        return Promotion(model_name, metric, False, candidate, current,
                         f"version {candidate} ({shown}) is already the @{CHAMPION} of {model_name}: nothing to do")

    beats, why = _beats(versions, scores, metric, candidate, current)
    if not beats and not force:
        return Promotion(model_name, metric, False, candidate, current,
                         f"kept version {current} as @{CHAMPION} of {model_name}: candidate version {candidate} "
                         f"({shown}) was not promoted because {why}; use --force to promote it anyway")
    client.set_registered_model_alias(model_name, CHAMPION, candidate)
    if not beats:
        why = f"forced, although {why}"
    return Promotion(model_name, metric, True, candidate, current,
                     f"promoted version {candidate} of {model_name} to @{CHAMPION} ({shown}): {why}")
