"""What the sections of benchmarks/sweep.py share: the temporary stores they are isolated in,
data and run helpers (digits subsets, fresh caches, MLflow child runs, Optuna trials), the
output's tables, and the warm-up that no side of any comparison pays.

Nothing here imports a scenesweep module at import time: ``isolate`` must run first.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
IMAGE_SIZE = 32

# The package itself is imported by _common (src/ put on the path when it is not installed); its
# modules are imported after the stores are redirected, see ``isolate``.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, the other sweep_*.py modules
from _common import digits_subset, flops_per_image  # noqa: E402
from _common import table as _table  # noqa: E402


# --------------------------------------------------------------------------------------------
# Isolation from the project's stores
# --------------------------------------------------------------------------------------------

def isolate(tmp: Path) -> str:
    """Point MLflow at a SQLite file in ``tmp`` before any scenesweep module that tracks is imported.

    ``scenesweep.tracking.mlflow_store`` reads MLFLOW_TRACKING_URI when it sets up tracking, and falls back to
    the project's ``mlruns/``: setting it first keeps every run of this benchmark out of there.
    MLFLOW_RUN_ID and friends are dropped so that a launch from ``mlflow run`` does not attach
    the benchmark's runs to the launcher's run.

    Returns:
        The Optuna storage URL (a SQLite file beside the MLflow one).
    """
    store = tmp / "store"
    store.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("SCENESWEEP_OFFLINE", "1")  # random weights: nothing to download
    os.environ["TQDM_DISABLE"] = "1"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)
    return f"sqlite:///{(store / 'optuna.db').as_posix()}"


def quiet_libraries() -> None:
    """Keep MLflow's per-run INFO lines (system metrics, model validation) out of the output.

    Called after ``isolate``: mlflow sets its logger's level when it is imported, so it is
    imported here first and the level lowered after.
    """
    import mlflow  # noqa: F401

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------------------------
# Helpers: data, runs, tables
# --------------------------------------------------------------------------------------------

def subset_train_per_class(per_class: int) -> int:
    """Training pool per class for a subset: about two thirds, the rest is the test split."""
    return per_class - max(1, per_class // 3)


def child_runs(parent_run_id: str) -> list:
    """The trial runs of a study's parent run, in trial order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000)
    return sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))


def trial_number(run) -> int:
    """The Optuna trial number of a study's child run (its ``trial_number`` tag)."""
    return int(run.data.tags["trial_number"])


def duration_s(run) -> float:
    """End minus start of an MLflow run (create_run .. set_terminated), in seconds."""
    return (run.info.end_time - run.info.start_time) / 1000.0


def load_trials(study_name: str, storage: str) -> list:
    """The study's finished trials (complete, pruned or failed), in number order.

    Enqueued points beyond the trial budget stay WAITING in the storage: they never ran.
    """
    import optuna
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False, states=finished)
    return sorted(trials, key=lambda t: t.number)


def fresh_cache(tmp: Path, name: str) -> Path:
    """An empty cache folder, with the in-process memo of every cache dropped."""
    from scenesweep.compute import feature_cache

    feature_cache.forget_memos()  # the memo would otherwise serve arrays across "fresh" caches
    path, number = tmp / "caches" / name, 1
    while path.exists():
        path, number = tmp / "caches" / f"{name}-{number}", number + 1
    path.mkdir(parents=True)
    return path


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def gmacs_per_image(image_size: int, fc_width: int) -> tuple[float, float]:
    """(convolutions, fc6 + fc7) multiply-adds per image, in G, for VGG16 (``_common.flops_per_image``)."""
    conv, fc = flops_per_image(image_size, fc_width=fc_width)
    return conv / 2e9, fc / 2e9


def table(header: list[str], rows: list[list[Any]]) -> str:
    return _table(header, rows, indent="   ")


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Warm-up
# --------------------------------------------------------------------------------------------

def warm_up(tmp: Path, storage: str) -> float:
    """One-time costs that belong to no side of any comparison; returns their seconds.

    The MLflow and Optuna schemas are created on first use (seconds of migrations), and the
    first extraction of a process picks oneDNN kernels: whichever side ran first would pay them.
    """
    from scenesweep.compute import training
    from scenesweep.search import optuna_storage as search
    from scenesweep.tracking import mlflow_store
    from scenesweep.core.config import make_config

    began = time.perf_counter()
    mlflow_store.setup_tracking()
    search.open_storage(storage)
    tiny = digits_subset(tmp, 6)
    config = make_config("svm", {"data": str(tiny), "train_per_class": 4, "image_size": IMAGE_SIZE,
                                 "cache_dir": str(fresh_cache(tmp, "warmup"))})
    training.fit_head(training.prepare(config, progress=False))
    return time.perf_counter() - began

