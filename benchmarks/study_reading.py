"""Reading the MLflow and Optuna stores after each experiment: every run and trial, and per
stage its work runs (``WorkRun``: images extracted, epochs and head steps, refits included)
and its result figures (trial states, accuracy, the extractor's logged speed).

Part of ``benchmarks/study.py``; it reads the stores only, not the package's internals.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other study_*.py modules
from study_runs import Stage  # noqa: E402
from study_setup import Setup  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
POOL5_WIDTH = 512 * 7 * 7  # VGG's adaptive average pool to 7x7 makes pool5 25088-d at any input size
USER_ATTR_RUN_ID = "mlflow_run_id"  # the trial's MLflow run (README: Sweeps, Tracking)


def all_runs(client) -> dict[str, Any]:
    """Every run of every experiment (deleted ones too), by run id."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = {}, None
    while experiments:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs.update({r.info.run_id: r for r in page})
        token = page.token
        if not token:
            break
    return runs


def optuna_storage_url(runs: dict, default: str) -> str:
    """The Optuna storage the studies used: the parent runs' ``optuna.storage`` tag, else ``default``."""
    for run in runs.values():
        url = run.data.tags.get("optuna.storage")
        if url and url.startswith("sqlite:"):
            return url
    return default


def all_trials(storage_url: str) -> dict[tuple[str, int], Any]:
    """Every trial of every study in the storage, by (study name, number); {} when none exists."""
    path = storage_url[len("sqlite:///"):] if storage_url.startswith("sqlite:///") else None
    if path is not None and not Path(path).is_file():
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = {}
    for name in optuna.get_all_study_names(storage=storage_url):
        study = optuna.load_study(study_name=name, storage=storage_url)
        trials.update({(name, t.number): t for t in study.get_trials(deepcopy=False)})
    return trials


def param(run, name: str, default: Any = None) -> Any:
    """A run parameter as resolved: ``resolved.<name>`` (set when `mlflow run` logged it as given) first."""
    params = run.data.params
    return params.get(f"resolved.{name}", params.get(name, default))


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir()
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_sizes(data: str, train_per_class: int, val_fraction: float) -> dict[str, int]:
    """Training-split size and class count from the folder and the README's protocol.

    Flat layout: ``train_per_class`` images per class for training, the rest for test; then
    ``round(n * val_fraction)`` of each class's training images for validation. With
    ``train/`` and ``test/``: the same carving of ``train/``. (Trials log no split sizes.)
    """
    root = Path(data)
    if (root / "train").is_dir():
        pools = [count_images(c) for c in class_folders(root / "train")]
        total = sum(pools) + sum(count_images(c) for c in class_folders(root / "test"))
    else:
        counts = [count_images(c) for c in class_folders(root)]
        pools, total = [train_per_class] * len(counts), sum(counts)
    n_train = sum(pool - int(round(pool * val_fraction)) for pool in pools)
    return {"n_train": n_train, "n_classes": len(pools), "n_images": total}


def feature_width(layer: str, fc_width: int) -> int:
    return POOL5_WIDTH if layer == "pool5" else fc_width


@dataclass
class WorkRun:
    """A run that fitted a head (a single run or a trial), with the work it did."""

    run_id: str
    stage: str
    head: str
    own_setting: bool  # a single run or an enqueued trial: the study's own settings
    duration_s: float
    images_extracted: int
    extract_key: tuple | None  # (arch, image_size, batch_size, precision) of its extraction
    extract_images_per_s: float | None
    epochs: int
    steps: int
    head_key: tuple | None  # (widths, batch_size) of an mlp head
    logged_step_s: float | None
    refit_steps: int = 0
    branches: int = 1  # pooling types its one extraction pass filled (the trunk shared)


def describe_runs(stage: str, runs: list, trials_by_run: dict, client, data_dir: str,
                  parents: list) -> list[WorkRun]:
    """The work runs of one stage: extraction, epochs and steps of each (refits included)."""
    work: list[WorkRun] = []
    for run in runs:
        head = param(run, "head")
        if head not in ("svm", "mlp") or run.data.tags.get("sweep") in ("parent", "worker"):
            continue
        trial = trials_by_run.get(run.info.run_id)
        own = trial is None or bool(trial.system_attrs.get("fixed_params"))
        end = run.info.end_time or run.info.start_time
        metrics = run.data.metrics
        batch_size = int(param(run, "batch_size", 32))
        images = 0
        extract_key = None
        if run.data.tags.get("conv_cache") == "miss":
            n_images = sum(int(param(run, f"n_{s}", 0) or 0) for s in ("train", "val", "test"))
            if not n_images:
                n_images = split_sizes(param(run, "data", data_dir), int(param(run, "train_per_class", 100)),
                                       float(param(run, "val_fraction", 0.2)))["n_images"]
            images = n_images
            precision = param(run, "resolved.precision") or param(run, "precision", "auto")
            extract_key = (param(run, "arch", "vgg16"), int(param(run, "image_size", 224)), batch_size, precision)
        epochs = steps = 0
        head_key = None
        if head == "mlp":
            epochs = len(client.get_metric_history(run.info.run_id, "train/loss"))
            sizes = split_sizes(param(run, "data", data_dir), int(param(run, "train_per_class", 100)),
                                float(param(run, "val_fraction", 0.2)))
            n_train = int(param(run, "n_train", sizes["n_train"]))
            n_classes = int(param(run, "n_classes", sizes["n_classes"]))
            hidden = [int(h) for h in str(param(run, "hidden", "1024,1024")).split(",") if h.strip()]
            widths = (feature_width(param(run, "layer", "pool5"), int(param(run, "fc_width", 4096))),
                      *hidden, n_classes)
            per_epoch = math.ceil(n_train / batch_size)
            steps = epochs * per_epoch
            head_key = (widths, batch_size)
        # A pooling study's first pass fills every pooling type's conv entry at once.
        branches = int(metrics.get("time/extract_branches", 1) or 1) if images else 1
        work.append(WorkRun(run.info.run_id, stage, head, own, max(0.0, (end - run.info.start_time) / 1000),
                            images, extract_key, metrics.get("time/extract_images_per_s") if images else None,
                            epochs, steps, head_key, metrics.get("time/train_batch_median_s"), branches=branches))
    add_refit_steps(work, runs, parents)
    return work


def add_refit_steps(work: list[WorkRun], runs: list, parents: list) -> None:
    """Count into ``work`` the head steps of the refits that compute test accuracy."""
    # Refits: the test evaluation of a study's best trial (on the parent: best/val/acc_refit) and
    # of the best trial per group (on the trial's run: val/acc_refit) train the head again, fully.
    by_id = {r.info.run_id: r for r in runs}
    by_work = {w.run_id: w for w in work}
    refitted = [r.info.run_id for r in runs if "val/acc_refit" in r.data.metrics]
    for parent in parents:
        if "best/val/acc_refit" in parent.data.metrics and parent.data.tags.get("best_run_id"):
            refitted.append(parent.data.tags["best_run_id"])
    for run_id in refitted:
        target = by_work.get(run_id)
        if target is not None and target.head == "mlp" and run_id in by_id:
            full_epochs = int(param(by_id[run_id], "epochs", target.epochs))
            target.refit_steps += full_epochs * (target.steps // max(target.epochs, 1))


def read_stage(stage: Stage, measured: dict, new_runs: list, new_trials: list, client, setup: Setup) -> list[WorkRun]:
    """One stage's work runs, and its result (``stage.result``): runs, trial states, images,
    epochs, steps, the extractor's logged speed and the best accuracy."""
    trials_by_run = {t.user_attrs.get(USER_ATTR_RUN_ID): t for t in new_trials}
    parents = [r for r in new_runs if r.data.tags.get("sweep") == "parent"]
    stage_work = describe_runs(stage.name, new_runs, trials_by_run, client, str(setup.data), parents)
    states = defaultdict(int)
    for t in new_trials:
        states[t.state.name] += 1
    best = {}
    for r in parents:
        best.update({k: v for k, v in r.data.metrics.items() if k.startswith(("best/val", "test/"))})
    if not parents:
        for r in new_runs:
            best.update({k: v for k, v in r.data.metrics.items() if k in ("val/acc", "test/acc")})
    measured.update({
        "runs": len(new_runs), "trials": dict(states),
        "images_extracted": sum(w.images_extracted * w.branches for w in stage_work),
        "epochs": sum(w.epochs for w in stage_work),
        "head_steps": sum(w.steps for w in stage_work),
        "refit_steps": sum(w.refit_steps for w in stage_work),
        "extract_images_per_s": [w.extract_images_per_s for w in stage_work if w.extract_images_per_s],
        "own_setting_runs_s": sum(w.duration_s for w in stage_work if w.own_setting),
        "accuracy": best, "log": str(setup.logs / f"{stage.name}.log")})
    stage.result = measured
    return stage_work
