"""A study's setting, checked before its first trial: what its results depend on (``study_setting``),
that a resumed study runs under the same one, that its values and filters are valid.

The sweep driver (``runs.sweep``) calls these; they start no run and no trial.
"""
from __future__ import annotations


import mlflow
import optuna

from ..compute.training import check_folds, check_setting
from ..core.config import result_parameters
from ..core.errors import ConfigError, UserError
from ..core.store_urls import redact
from ..specs.studies import StudySpec


def study_setting(spec: StudySpec, dataset_fingerprint: str | None = None) -> dict[str, str]:
    """The fixed settings a study's trials were measured under (data, weights, image size, ...:
    those that change a result of its head; a study may resume under other devices or cache
    folders), its tuning trials' own (``tuning.<name>``), and the dataset's content (``dataset``:
    its fingerprint) when it was loaded."""
    config = spec.base
    measured = result_parameters(spec.tunes)
    setting = {k: str(v) for k, v in config.values.items() if k not in spec.space and k in measured}
    setting.update({f"tuning.{k}": str(v) for k, v in spec.tuning.items() if k in measured})
    if dataset_fingerprint:
        setting["dataset"] = dataset_fingerprint
    return setting


def check_same_setting(study: optuna.Study, spec: StudySpec, storage_url: str,
                       dataset_fingerprint: str | None = None) -> None:
    """Record the setting of a new study; refuse to resume one made under another setting.

    Resuming a digits demo study with ``data=15-Scene`` would mix trials measured on two
    datasets (and could run no new trial at all): say so and how to start a new study instead.
    The dataset is compared by content when both sides know it: workers on other machines keep
    the same images under other paths (``--data /mnt/15-Scene`` joins a study started with
    ``--data ~/data/15-Scene``).

    Raises:
        ConfigError: naming the settings that differ.
    """
    setting = study_setting(spec, dataset_fingerprint)
    recorded = study.user_attrs.get("setting")
    if recorded is None:
        study.set_user_attr("setting", setting)
        return
    differ = {k: (recorded.get(k), v) for k, v in setting.items() if recorded.get(k) != v}
    if "dataset" in recorded and "dataset" in setting:
        differ.pop("data", None)  # same content wherever it lies: the same dataset
        if "dataset" in differ:
            differ["dataset"] = tuple(str(value)[:12] + "..." for value in differ["dataset"])
            differ["data"] = (recorded.get("data"), setting.get("data"))
    elif "dataset" not in recorded:
        differ.pop("dataset", None)  # a study recorded before datasets were named by content
    if differ:
        shown = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(differ.items()))
        raise ConfigError(f"study {study.study_name!r} in {redact(storage_url)} was run under other "
                          f"settings ({shown}); resume it with the same settings, or start a new study with "
                          "--study_name NAME (MLproject: -P study_name=NAME)")


def check_study_setting(spec: StudySpec):
    """The study's fixed setting checked before any trial (data, weights, device, cache folder,
    enough images per class for its folds, its filters).

    Returns:
        The dataset and split, loaded once for every trial (None when the study searches a
        data parameter).
    """
    check_filters(spec)
    try:
        data = check_setting(spec.base, skip=tuple(spec.space))
        if data is not None and spec.folds:
            check_folds(*data, spec.folds)
        return data
    except UserError as error:
        # The file names the setting (its fixed:) unless the command line overrode it.
        raise ConfigError(f"{spec.path}: {error}") from None


def check_filters(spec: StudySpec) -> None:
    """``select.where`` and ``warm_start.where`` parse as MLflow's run filters (one error naming
    the key, before any trial)."""
    from mlflow.utils.search_utils import SearchUtils

    for key, where in (("select.where", spec.select.where if spec.select else ""),
                       ("warm_start.where", spec.warm_start.where if spec.warm_start else "")):
        if not where:
            continue
        comparators = {"metric": SearchUtils.VALID_METRIC_COMPARATORS, "parameter": SearchUtils.VALID_PARAM_COMPARATORS,
                       "tag": SearchUtils.VALID_TAG_COMPARATORS}
        try:
            for clause in SearchUtils.parse_search_filter(where):
                allowed = comparators.get(clause["type"])
                if allowed is not None and clause["comparator"].upper() not in allowed:
                    raise ConfigError(f"{clause['comparator']!r} is not a comparator of {clause['type']}s; "
                                      f"expected one of {', '.join(sorted(allowed))}")
        except (mlflow.exceptions.MlflowException, ConfigError) as error:
            message = error.message if isinstance(error, mlflow.exceptions.MlflowException) else str(error)
            raise ConfigError(f"{spec.path}: {key}={where!r}: not a filter MLflow reads "
                              f"({str(message).splitlines()[0]}); e.g. \"metrics.`model/size_mb` <= 300\"") from None
