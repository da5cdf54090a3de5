"""The one sink: logs what the pipeline returns (params, metrics, tags, artifacts) into a run.

Every call names its run (``run_id``), so the same functions serve single runs, trial runs and
a study's parent run whichever process holds it. Computation never calls MLflow: it returns
numbers and dicts (and per-epoch metrics through ``on_epoch``) and these functions log them.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from ..compute.backbone import LayerRow, backbone_facts, format_layer_table
from ..core.config import PARAMETER_BY_NAME, RunConfig
from . import plots, provenance

if TYPE_CHECKING:  # training pulls in torch and torchvision (5 s): `scenesweep ui` needs neither
    from ..compute.data import Dataset, Split
    from ..compute.features import Features
    from ..compute.training import Prepared, RunResult

# The MLflow input context of each split: the runs table's Dataset column shows it beside the name.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
PER_CLASS_TABLE = "per_class.json"


def param_value(value: Any) -> str:
    """Numbers stay plain numbers (the UI's parallel coordinates and charts read them)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def log_batch(run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0) -> None:
    """One ``log_batch`` call (40 ms for 1000 points on SQLite against seconds one by one)."""
    now = int(time.time() * 1000)
    client = MlflowClient()
    params = {k: param_value(v) for k, v in (params or {}).items()}
    if params:
        # `mlflow run` has already logged the MLproject's parameters as given (e.g. '' for "the
        # study file's value", '32.0'): params are immutable, so a resolved value that differs
        # goes under 'resolved.<name>'; one logged before stays, the same value is not resent.
        logged = client.get_run(run_id).data.params
        params = {(k if k not in logged else f"resolved.{k}"): v for k, v in params.items() if logged.get(k) != v}
        params = {k: v for k, v in params.items() if k not in logged}
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None and np.isfinite(v)],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


def epoch_logger(run_id: str):
    """An ``on_epoch`` callback that logs each epoch's metrics with step = epoch."""

    def on_epoch(epoch: int, metrics: dict) -> None:
        log_batch(run_id, metrics=metrics, step=epoch)

    return on_epoch


def timing_metrics(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'extract': {'batch_p95_s': ..}} -> {'time/extract_batch_p95_s': ..}."""
    return {f"time/{stage}_{name}": value for stage, stats in timings.items() for name, value in stats.items()}


def config_params(config: RunConfig) -> dict[str, Any]:
    return dict(config.values)


def precision_params(features: Features) -> dict[str, str]:
    """What the extraction ran in and why: ``resolved.precision`` (fp32 or bf16, whatever the
    ``precision`` parameter said) and ``precision_reason`` (measured, cached or given)."""
    return {"resolved.precision": features.precision, "precision_reason": features.precision_reason}


def head_precision_params(result: RunResult) -> dict[str, str]:
    """What an mlp head trained in and why (nothing for the svm)."""
    choice = result.head_precision
    return {} if choice is None else {"resolved.head_precision": choice.precision,
                                      "head_precision_reason": choice.reason}


def backbone_params(config: RunConfig) -> dict[str, Any]:
    """``backbone.*``: family, parameters, feature width, ImageNet top-1 of its weights."""
    return backbone_facts(config.arch, config.layer, config.pooling, config.fc_width, config.image_size)


def unit_tags(config: RunConfig) -> dict[str, str]:
    return {f"unit.{n}": PARAMETER_BY_NAME[n].unit for n in config.values if PARAMETER_BY_NAME[n].unit}


def hardware_tags(device: str) -> dict[str, str]:
    """``hardware.*`` tags: what the run ran on (``compute.hardware.machine_facts``: CPU model, flags
    and torch's capability, cores, threads, memory, library versions, device; GPU details on CUDA)."""
    from ..compute.hardware import machine_facts  # here: `scenesweep ui` and `report` need no torch (5 s)

    return {f"hardware.{k}": v for k, v in machine_facts(device).items()}


def cache_tags(features: Features) -> dict[str, str]:
    """Whether the features came from the cache (layer and conv entries) and under which key; on a
    hit, how fast the extraction that filled the entry ran (``cache.extraction_*``: that run's
    figures, which this run's ``time/*`` metrics leave out)."""
    tags = {"cache_key": features.key, "cache": "hit" if features.hit else "miss", "conv_cache": features.conv_state}
    if features.conv_hit:
        for name in ("batch_mean_s", "images_per_s"):
            if name in features.extract_timing:
                tags[f"cache.extraction_{name}"] = f"{features.extract_timing[name]:.4g}"
    return tags


def log_dataset(run_id: str, prepared: Prepared) -> None:
    """The manifest with each image's split, as ``dataset/manifest.json``."""
    dataset, split = prepared.dataset, prepared.split
    subset = np.empty(len(dataset.paths), dtype=object)
    subset[split.train], subset[split.val], subset[split.test] = "train", "val", "test"
    manifest = {"root": str(dataset.root), "layout": dataset.layout, "classes": list(dataset.classes),
                "fingerprint": dataset.fingerprint, "split_fingerprint": split.fingerprint,
                "sizes": split.sizes(),
                "images": [{**entry, "label": dataset.classes[dataset.labels[i]], "split": subset[i]}
                           for i, entry in enumerate(dataset.manifest)]}
    MlflowClient().log_dict(run_id, manifest, "dataset/manifest.json")


class ImageFolderSource(DatasetSource):
    """The data folder a dataset was read from (source type ``local``, as MLflow's own)."""

    def __init__(self, uri: str):
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "local"

    def load(self, dst_path=None) -> str:
        return self._uri

    @staticmethod
    def _can_resolve(raw_source) -> bool:
        return False  # built here only, never picked by MLflow's source registry

    @classmethod
    def _resolve(cls, raw_source) -> ImageFolderSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict) -> ImageFolderSource:
        return cls(source_dict["uri"])


class ImageSplitDataset(MetaDataset):
    """One split of an image folder as an MLflow dataset: metadata only (the images stay in the
    folder; ``dataset/manifest.json`` lists them), with a profile of its size."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict[str, Any]):
        schema = Schema([ColSpec(DataType.string, "path"), ColSpec(DataType.string, "label")])
        super().__init__(source=source, name=name, digest=digest, schema=schema)
        self._profile = profile

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(dataset: Dataset, indices: np.ndarray) -> str:
    """'<fingerprint[:8]>-<images[:8]>': the dataset's content (the ``dataset_fingerprint`` param's
    first 8 characters) and which of its images the split holds. Equal digests: the same images."""
    images = hashlib.sha256(f"{dataset.fingerprint}:{','.join(map(str, np.sort(indices).tolist()))}".encode())
    return f"{dataset.fingerprint[:8]}-{images.hexdigest()[:8]}"


def dataset_inputs(dataset: Dataset, split: Split) -> list[DatasetInput]:
    """The train, validation and test splits as MLflow dataset inputs (contexts training,
    validation, test), named after the data folder, source the data folder."""
    source = ImageFolderSource(str(dataset.root))
    inputs = []
    for part, context in DATASET_CONTEXTS.items():
        indices = getattr(split, part)
        labels = dataset.labels[indices]
        profile = {"images": int(len(indices)), "classes": int(len(np.unique(labels))),
                   "dataset_fingerprint": dataset.fingerprint, "split_fingerprint": split.fingerprint,
                   "layout": dataset.layout, "manifest": "dataset/manifest.json"}
        entity = ImageSplitDataset(source, dataset.root.name, split_digest(dataset, indices), profile)
        inputs.append(DatasetInput(entity._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


# What MLflow's SQL store answers when two processes insert the same dataset of an experiment at
# once (PostgreSQL's UniqueViolation on "dataset_pk", SQLite's "UNIQUE constraint failed: datasets").
DATASET_RACE = ("dataset_pk", "UNIQUE constraint failed: datasets", "duplicate key value violates unique constraint")
DATASET_TRIES = 5


def log_datasets(run_id: str, dataset: Dataset, split: Split) -> None:
    """``log_inputs`` of the three splits into ``run_id`` (the runs table's Dataset column).
    Logging the same splits again into a run adds nothing.

    MLflow's store looks a dataset up and inserts it when missing, not atomically: workers starting
    together on PostgreSQL race, and the loser's insert fails on the table's key. The dataset is
    there by then, so the same call again links it (up to ``DATASET_TRIES`` times)."""
    client = MlflowClient()
    for attempt in range(DATASET_TRIES):
        try:
            client.log_inputs(run_id, datasets=dataset_inputs(dataset, split))
            return
        except MlflowException as error:
            if attempt == DATASET_TRIES - 1 or not any(text in str(error) for text in DATASET_RACE):
                raise
            time.sleep(0.05 * (attempt + 1))


def log_run_context(run_id: str, config: RunConfig, prepared: Prepared, entry_point: str) -> None:
    """Everything a run logs before fitting: config, dataset, cache, hardware."""
    features = prepared.features
    log_batch(run_id,
              params={**config_params(config), "head": config.head or "none", **backbone_params(config),
                      "dataset_fingerprint": prepared.dataset.fingerprint,
                      "split_fingerprint": prepared.split.fingerprint, "cache_key": features.key,
                      "conv_cache_key": features.conv_key, **precision_params(features),
                      "n_classes": len(prepared.dataset.classes),
                      **{f"n_{k}": v for k, v in prepared.split.sizes().items()}},
              tags={"entry_point": entry_point, **cache_tags(features), "command": provenance.command_line(),
                    **hardware_tags(str(features.device)), **unit_tags(config)})
    MlflowClient().log_dict(run_id, config.as_dict(), "config.yaml")
    log_dataset(run_id, prepared)
    log_datasets(run_id, prepared.dataset, prepared.split)


def final_metrics(result: RunResult) -> dict[str, float]:
    """The run's final metrics and timings, without the per-epoch ones (logged with step = epoch
    already: the last epoch is the run's value)."""
    per_epoch = set(result.history[-1]) if result.history else set()
    return {**{k: v for k, v in result.metrics.items() if k not in per_epoch}, **timing_metrics(result.timings)}


def per_class_results(confusion: np.ndarray, classes: tuple[str, ...]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows = true class),
    and the summary metrics ``test/f1_macro`` and ``test/acc_balanced``: scikit-learn's
    ``precision_recall_fscore_support`` (``zero_division=0``: a class never predicted has precision
    0), ``f1_score(average="macro")`` over the classes present or predicted, and
    ``balanced_accuracy_score``, on the (true, predicted) pairs the matrix counts.
    """
    confusion = np.asarray(confusion, dtype=np.int64)  # (K, K)
    labels = np.arange(len(classes))
    y_true = np.repeat(np.repeat(labels, len(labels)), confusion.ravel())  # one entry per test image
    y_pred = np.repeat(np.tile(labels, len(labels)), confusion.ravel())
    if not len(y_true):
        zeros = np.zeros(len(classes))
        table = pd.DataFrame({"class": list(classes), "precision": zeros, "recall": zeros, "f1": zeros,
                              "support": zeros.astype(np.int64), "predicted": zeros.astype(np.int64)})
        return table, {"test/f1_macro": 0.0, "test/acc_balanced": 0.0}
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    table = pd.DataFrame({"class": list(classes), "precision": precision, "recall": recall, "f1": f1,
                          "support": support.astype(np.int64), "predicted": confusion.sum(axis=0).astype(np.int64)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": counted as sklearn does
        metrics = {"test/f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
                   "test/acc_balanced": float(balanced_accuracy_score(y_true, y_pred))}
    return table, metrics


def log_per_class(run_id: str, confusion: np.ndarray, classes: tuple[str, ...],
                  extra_columns: dict[str, Any] | None = None, table: bool = True) -> dict[str, float]:
    """``test/f1_macro``, ``test/acc_balanced`` and the per-class table (``per_class.json``, a
    ``log_table`` table: one row per class; ``extra_columns`` e.g. the trial number).

    Args:
        table: log the table too (``log_table`` appends to a table logged before: a summary
            that has logged it for the same trial already passes False).

    Returns:
        The summary metrics.
    """
    rows, metrics = per_class_results(confusion, classes)
    for name, value in (extra_columns or {}).items():
        rows.insert(0, name, value)
    log_batch(run_id, metrics=metrics)
    if table:
        MlflowClient().log_table(run_id, data=rows, artifact_file=PER_CLASS_TABLE)
    return metrics


def log_result(run_id: str, result: RunResult, title: str) -> None:
    """Final metrics, timings, plots, per-class results: everything a run logs after fitting."""
    log_batch(run_id, metrics=final_metrics(result), params=head_precision_params(result), step=len(result.history))
    classes = result.prepared.dataset.classes
    client = MlflowClient()
    if result.confusion is not None:
        plots.log_figure(plots.confusion_figure(result.confusion, classes, f"{title}: test confusion"),
                         "plots/confusion_matrix.png", run_id)
        client.log_dict(run_id, {"classes": list(classes), "matrix": result.confusion.tolist()},
                        "confusion_matrix.json")
        result.metrics.update(log_per_class(run_id, result.confusion, classes))
    if result.history:
        plots.log_figure(plots.curves_figure({"": result.history}, title), "plots/curves.png", run_id)


def log_layer_table(run_id: str, config: RunConfig, rows: list[LayerRow]) -> str:
    """The Q1 table of the run's network as ``layer_table.md``; returns the table."""
    table = format_layer_table(rows)
    MlflowClient().log_text(run_id, f"# {config.arch} at {config.image_size} px, pooling {config.pooling}, "
                                    f"fc width {config.fc_width}\n\n{table}\n", "layer_table.md")
    return table


def system_metrics_monitor(run_id: str, node_id: str | None = None):
    """MLflow's system metrics (CPU, memory, GPU with nvidia-ml-py) sampled into ``run_id`` while
    this process works on it; several workers of one run log under their own ``node_id``.

    Returns:
        The started monitor (call ``finish()``), or None where it cannot run.
    """
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
                                       resume_logging=True, node_id=node_id)
        monitor.start()
    except Exception:  # no psutil, or a store that refuses: the work goes on without them
        return None
    return monitor
