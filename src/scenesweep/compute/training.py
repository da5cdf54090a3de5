"""The single-run pipeline: data -> split -> cached features -> head -> metrics.

Plain functions returning numbers and dicts; tracking receives them (and per-epoch metrics
through ``on_epoch``). Test accuracy is computed once, for the final model, and only when asked:
a sweep's trials select on validation accuracy and never see the test split.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedKFold

from .atomic_files import sweep_orphans
from .backbone import check_weights
from ..core.config import RunConfig, data_parameters, parse_hidden
from ..core.errors import ConfigError
from .data import Dataset, Split, load_dataset, split_dataset
from .features import Features, compute_features
from .hardware import resolve_device
from .heads import EpochCallback, make_head
from .precision import PrecisionChoice, choose_head


@dataclasses.dataclass
class Prepared:
    """What every trial of one feature setting shares: data, split and features."""

    config: RunConfig
    dataset: Dataset
    split: Split
    features: Features

    @property
    def device(self) -> torch.device:
        """The run's device, resolved once when its features were computed."""
        return self.features.device

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of 'train', 'val' or 'test'."""
        index = getattr(self.split, name)
        return self.features.values[index], self.dataset.labels[index]


@dataclasses.dataclass
class RunResult:
    """A fitted head with its metrics.

    Attributes:
        metrics: 'train/acc', 'train/loss', 'val/acc', 'val/loss' and, when evaluated,
            'test/acc', 'test/loss'.
        history: per-epoch dicts (mlp only): epoch, train/loss, train/acc, val/loss, val/acc.
        timings: what this run spent, by stage: 'extract' per-batch statistics when the
            convolutions ran here, 'cache' and 'layer' seconds (``Features.stage_timing``),
            'train' per-batch statistics.
        confusion: (n_classes, n_classes) test confusion matrix, rows = true class.
        head_precision: what an mlp head trained in, and why (None for the svm).
        refitted: the head was trained again to be scored (its trial's own head was not at hand).
    """

    prepared: Prepared
    head: BaseEstimator
    metrics: dict[str, float]
    history: list[dict]
    timings: dict[str, dict[str, float]]
    confusion: np.ndarray | None = None
    head_precision: PrecisionChoice | None = None
    refitted: bool = False


# The cache's folders: features, measured precisions, kept heads, written datasets (digits), the
# compiled conv graphs.
CACHE_PARTS = ("features", "precision", "heads", "datasets", "inductor")


def check_cache_dir(folder: Path) -> None:
    """The feature cache must be a folder this process can write (created when missing).

    Raises:
        ConfigError: naming the folder and why it cannot be used.
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"cache_dir={str(folder)!r}: is a file; expected a folder for the feature cache")
    for part in CACHE_PARTS:
        if (folder / part).exists() and not (folder / part).is_dir():
            raise ConfigError(f"cache_dir={str(folder)!r}: {folder / part} is a file; expected the cache's "
                              f"{part}/ folder there (remove the file)")
    for part in CACHE_PARTS:  # what writers killed mid-write left (their processes are gone)
        if (folder / part).is_dir():
            sweep_orphans(folder / part)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"cache_dir={str(folder)!r}: not a writable folder "
                          f"({error.strerror or error.__class__.__name__})") from None


def check_setting(config: RunConfig, skip: tuple[str, ...] = ()) -> tuple[Dataset, Split] | None:
    """Check everything of a run's setting that can be wrong, before any MLflow run starts.

    The cache folder is writable, the device present, the weights load into the network (on
    the meta device: nothing is computed), the dataset reads and every image decodes (once per
    dataset content) and there are at least two classes and a validation split.

    Args:
        config: the run's configuration.
        skip: parameters whose value is not fixed yet (a study searches them): what depends on
            them is left to each trial.

    Returns:
        The dataset and split, loaded once (None when a data parameter is in ``skip``).

    Raises:
        UserError: one message naming the parameter, file or folder and what was expected.
    """
    if "cache_dir" not in skip:
        check_cache_dir(config.cache_path)
    if "device" not in skip:
        resolve_device(config.device)
    if not {"arch", "weights"} & set(skip):
        check_weights(config.arch, config.weights, config.image_size)
    if set(data_parameters()) & set(skip):
        return None
    return load_data(config)


def load_data(config: RunConfig) -> tuple[Dataset, Split]:
    """Read and check the dataset, carve the validation split (fast: no network runs)."""
    dataset = load_dataset(config.data, config.train_per_class, config.seed, config.cache_path)
    return dataset, split_dataset(dataset, config.val_fraction, config.seed)


def prepare(config: RunConfig, progress: bool = True, data: tuple[Dataset, Split] | None = None,
            share_poolings: tuple[str, ...] = (), device: torch.device | None = None) -> Prepared:
    """Load the dataset (unless given), carve the validation split and get features (cached);
    ``share_poolings``, ``device``: see ``compute_features``."""
    dataset, split = data or load_data(config)
    features = compute_features(config, dataset, progress=progress, share_poolings=share_poolings, device=device)
    return Prepared(config, dataset, split, features)


def head_params(config: RunConfig, progress: bool = False, precision: str | None = None,
                device: torch.device | None = None) -> dict:
    """The head's hyperparameters from a config (the rest of the config is ignored); ``precision``
    and ``device``: the resolved ones (the config's may be "auto")."""
    return {**config.values, "progress": progress, "precision": precision or config.precision,
            "device": str(device) if device is not None else config.device}


def choose_head_precision(prepared: Prepared, config: RunConfig) -> PrecisionChoice | None:
    """What an mlp head trains in: as given, or the faster of fp32 and bf16 autocast measured on
    this machine for the head's widths and batch (kept in the cache folder); None for the svm."""
    if config.head != "mlp":
        return None
    widths = (prepared.features.values.shape[1], *parse_hidden(config.hidden), len(prepared.dataset.classes))
    return choose_head(config.precision, widths, config.batch_size, prepared.device, config.cache_path)


def fit_head(prepared: Prepared, config: RunConfig | None = None, on_epoch: EpochCallback | None = None,
             evaluate_test: bool = False, progress: bool = False) -> RunResult:
    """Fit the configured head on the train split, select on val, optionally score test once.

    Args:
        prepared: shared data and features (``config`` may change only head parameters).
        config: the run's configuration, default ``prepared.config``.
        on_epoch: receives (epoch, metrics) after each epoch of an mlp head.
        evaluate_test: compute test accuracy and the confusion matrix (the final model only).
        progress: show a progress bar over epochs.
    """
    config = config or prepared.config
    head_precision = choose_head_precision(prepared, config)
    head = make_head(config.head, **head_params(config, progress, head_precision and head_precision.precision,
                                                  prepared.device))
    X_train, y_train = prepared.part("train")
    X_val, y_val = prepared.part("val")
    began = time.perf_counter()
    head.fit(X_train, y_train, eval_set=(X_val, y_val), on_epoch=on_epoch)
    fit_seconds = time.perf_counter() - began
    metrics = fit_metrics(prepared, head)
    confusion = None
    if evaluate_test:
        test_metrics, confusion = evaluate_test_split(prepared, head)
        metrics.update(test_metrics)
    timings = {**prepared.features.stage_timing(),
               "train": getattr(head, "train_timing_", {}) or {"fit_s": fit_seconds}}
    timings["train"]["fit_s"] = fit_seconds
    return RunResult(prepared, head, metrics, list(getattr(head, "history_", [])), timings, confusion,
                     head_precision)


def check_folds(dataset: Dataset, split: Split, folds: int) -> None:
    """Every class has at least ``folds`` training images (train + validation split).

    Raises:
        ConfigError: naming the class and its count.
    """
    counts = np.bincount(dataset.labels[np.concatenate([split.train, split.val])], minlength=len(dataset.classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] < folds:
        raise ConfigError(f"validation.folds={folds}: class {dataset.classes[smallest]!r} has {counts[smallest]} "
                          f"training images; each fold needs one of every class (folds <= {counts[smallest]})")


def fit_head_folds(prepared: Prepared, config: RunConfig, folds: int, on_fold: EpochCallback | None = None,
                   progress: bool = False) -> RunResult:
    """Cross-validated selection: stratified ``folds``-fold over the training images (the train
    and validation splits together), each fold's head fitted on the others and scored on it, then
    the head fitted on all of them (the one a study keeps and scores on test, once).

    ``val/acc`` and ``val/loss`` are the folds' means (``val/acc_std`` their spread); ``on_fold``
    receives (fold, {"fold/val/acc": ..., "fold/val/loss": ...}) after each fold, fold = 1..K: the
    steps a pruner compares (Optuna's WilcoxonPruner tests them pairwise against the best trial's).
    """
    index = np.concatenate([prepared.split.train, prepared.split.val])
    X, y = prepared.features.values[index], prepared.dataset.labels[index]  # (N, D), (N,)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    # The same precision and device as a single fit (before, "auto" reached the head unresolved: fp32).
    head_precision = choose_head_precision(prepared, config)
    params = head_params(config, False, head_precision and head_precision.precision, prepared.device)
    accuracy, loss = [], []
    began = time.perf_counter()
    for fold, (fit_index, held_out) in enumerate(splitter.split(X, y), start=1):
        head = make_head(config.head, **params).fit(X[fit_index], y[fit_index])
        accuracy.append(float(np.mean(head.predict(X[held_out]) == y[held_out])))
        loss.append(head.loss(X[held_out], y[held_out]))
        if on_fold is not None:
            on_fold(fold, {"fold/val/acc": accuracy[-1], "fold/val/loss": loss[-1]})
    head = make_head(config.head, **params).fit(X, y)
    fit_seconds = time.perf_counter() - began
    metrics = {"train/acc": float(np.mean(head.predict(X) == y)), "train/loss": head.loss(X, y),
               "val/acc": float(np.mean(accuracy)), "val/loss": float(np.mean(loss)),
               "val/acc_std": float(np.std(accuracy)), "val/folds": float(folds)}
    timings = {**prepared.features.stage_timing(), "train": {"fit_s": fit_seconds}}
    return RunResult(prepared, head, metrics, [], timings, head_precision=head_precision)


def fit_metrics(prepared: Prepared, head: BaseEstimator) -> dict[str, float]:
    """Accuracy and loss of a fitted head on the train and validation splits."""
    metrics = {}
    for name in ("train", "val"):
        X, y = prepared.part(name)
        metrics[f"{name}/acc"] = float(np.mean(head.predict(X) == y))
        metrics[f"{name}/loss"] = head.loss(X, y)
    return metrics


def score_head(prepared: Prepared, head: BaseEstimator) -> RunResult:
    """A head fitted before (a trial's, kept) as a result: its train/val metrics on ``prepared``,
    its history and training timings as it recorded them."""
    timings = {**prepared.features.stage_timing(), "train": dict(getattr(head, "train_timing_", {}) or {})}
    return RunResult(prepared, head, fit_metrics(prepared, head), list(getattr(head, "history_", [])), timings)


def evaluate_test_split(prepared: Prepared, head: BaseEstimator) -> tuple[dict[str, float], np.ndarray]:
    """Test accuracy, loss and confusion matrix: called once, for the selected model."""
    X_test, y_test = prepared.part("test")
    predicted = head.predict(X_test)
    metrics = {"test/acc": float(np.mean(predicted == y_test)), "test/loss": head.loss(X_test, y_test)}
    labels = np.arange(len(prepared.dataset.classes))
    return metrics, confusion_matrix(y_test, predicted, labels=labels)
