"""Promotion: move the alias ``champion`` to the best registered version, when it beats the champion.

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

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..core.errors import ConfigError, first_line
from .registry import CHAMPION, PROMOTION_METRICS, RECORD_METRICS, quoted, version_tag_value


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


def _registered(client: MlflowClient, model_name: str, metric: str, where: str | None):
    """The registered model, once ``metric`` and ``where`` are known to make sense together."""
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"metric={metric!r}: expected one of {', '.join(PROMOTION_METRICS)}")
    if where and metric not in RECORD_METRICS:
        raise ConfigError(f"where={where!r}: filters model records; use it with a record metric "
                          f"({', '.join(RECORD_METRICS)}), not the version tag {metric!r}")
    try:
        return client.get_registered_model(model_name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(f"model {model_name!r} is not registered; registered models: "
                          f"{', '.join(names) or 'none'}") from None


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
    client = MlflowClient()
    registered = _registered(client, model_name, metric, where)
    versions = {str(v.version): v for v in client.search_model_versions(f"name={quoted(model_name)}")}
    eligible, searched = None, ""
    if metric in RECORD_METRICS:
        scores, matched, found = _record_scores(client, versions, metric, where)
        eligible = matched if where else None
        searched = (f"; {len(matched)} of {found} model record(s) matching {where!r} are versions of {model_name}"
                    if where else "")
    else:
        scores = {number: version_tag_value(v, metric) for number, v in versions.items()}
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
