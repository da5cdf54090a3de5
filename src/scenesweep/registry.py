"""The MLflow model registry: register a run's servable model, promote a champion.

Stages are deprecated in MLflow 3: promotion moves the alias ``champion``; a new version gets
``challenger``. Versions carry their validation and test accuracy as tags, so promotion
compares versions without reopening runs. (``search_model_versions`` returns empty aliases on
SQLite: aliases are read with ``get_registered_model``.)
"""
from __future__ import annotations

import dataclasses

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import ConfigError
from .serving import log_image_classifier

CHAMPION, CHALLENGER = "champion", "challenger"
# Version tags that promotion can rank by, and whether higher is better.
PROMOTION_METRICS = {"val_acc": True, "test_acc": True, "val_loss": False}


def register_result(run_id: str, result, model_name: str, extra_tags: dict[str, str] | None = None) -> str:
    """Log the servable image classifier of ``result`` in the active run and register it.

    The new version is tagged with the run, dataset fingerprint, validation and test accuracy
    (plus ``extra_tags``, e.g. study and trial) and gets the alias ``challenger``.

    Returns:
        The new version number.
    """
    model_uri = log_image_classifier(result, name="model")
    client = MlflowClient()
    version = mlflow.register_model(model_uri, model_name, tags={"run_id": run_id})
    metrics = result.metrics
    tags = {"run_id": run_id, "dataset_fingerprint": result.prepared.dataset.fingerprint,
            "val_acc": f"{metrics['val/acc']:.6f}", "val_loss": f"{metrics['val/loss']:.6f}",
            "head": result.prepared.config.head, "layer": result.prepared.config.layer,
            "pooling": result.prepared.config.pooling, "data": str(result.prepared.config.data),
            "weights": str(result.prepared.config.weights), **(extra_tags or {})}
    if "test/acc" in metrics:
        tags["test_acc"] = f"{metrics['test/acc']:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version.version)
    mlflow.set_tags({"registered_model": model_name, "registered_version": version.version})
    return version.version


@dataclasses.dataclass
class Promotion:
    """What ``promote`` did and why."""

    model: str
    metric: str
    promoted: bool
    version: str
    previous: str | None
    message: str


def promote(model_name: str, metric: str = "val_acc", force: bool = False, version: str | None = None) -> Promotion:
    """Move ``champion`` to the best version by ``metric`` if it beats the current champion.

    Args:
        model_name: registered model name.
        metric: a version tag from ``PROMOTION_METRICS``.
        force: move the alias even when the candidate does not beat the champion.
        version: promote this version instead of the best one.

    Raises:
        ConfigError: an unknown model name, metric or version.
    """
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"metric={metric!r}: expected one of {', '.join(PROMOTION_METRICS)}")
    client = MlflowClient()
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(f"model {model_name!r} is not registered; registered models: {', '.join(names) or 'none'}") from None
    higher_is_better = PROMOTION_METRICS[metric]
    versions = {v.version: v for v in client.search_model_versions(f"name='{model_name}'")}
    scored = {number: float(v.tags[metric]) for number, v in versions.items() if metric in v.tags}
    if version is not None:
        if str(version) not in versions:
            raise ConfigError(f"model {model_name!r} has no version {version}; versions: {', '.join(sorted(versions, key=int))}")
        candidate = str(version)
    else:
        if not scored:
            raise ConfigError(f"metric={metric!r}: no version of {model_name!r} carries it")
        candidate = (max if higher_is_better else min)(scored, key=lambda n: (scored[n], int(n)))
    current = registered.aliases.get(CHAMPION)
    value = scored.get(candidate)
    shown = f"{metric}={value:.4f}" if value is not None else f"no {metric}"
    if current == candidate:
        return Promotion(model_name, metric, False, candidate, current,
                         f"version {candidate} ({shown}) is already the champion of {model_name}")
    current_value = scored.get(current) if current else None
    beats = current is None or current_value is None or value is not None and (
        value > current_value if higher_is_better else value < current_value)
    if not beats and not force:
        return Promotion(model_name, metric, False, candidate, current,
                         f"kept version {current} as champion of {model_name}: candidate version {candidate} "
                         f"({shown}) does not beat it ({metric}={current_value:.4f}); use --force to promote anyway")
    client.set_registered_model_alias(model_name, CHAMPION, candidate)
    why = ("no champion before" if current is None else
           f"forced over version {current}" if not beats else
           f"beats version {current} ({metric}={current_value:.4f})")
    return Promotion(model_name, metric, True, candidate, current,
                     f"promoted version {candidate} of {model_name} to @{CHAMPION} ({shown}): {why}")
