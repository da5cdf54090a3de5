"""MLflow tracking: the store, runs, and the one sink that logs what the pipeline returns.

The tracking URI is MLFLOW_TRACKING_URI when set, else the absolute
``sqlite:////<repo>/mlruns/mlflow.db`` (a relative SQLite path would resolve per process, and
``mlflow run`` children, ``mlflow ui`` and ``mlflow models serve`` could end up on different
databases). Artifacts of the experiments this module creates live beside the database.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .config import PARAMETER_BY_NAME, ConfigError, RunConfig, repo_root  # noqa: E402
if TYPE_CHECKING:  # training pulls in torch and torchvision (5 s): `scenesweep ui` needs neither
    from .training import RunResult

HEALTH_TIMEOUT_S = 5.0  # a tracking server that does not answer /health in this time is down
PIP_PACKAGES = ("torch", "torchvision", "scikit-learn", "numpy", "pillow", "pandas", "mlflow")


def default_tracking_uri() -> str:
    return f"sqlite:///{(repo_root() / 'mlruns' / 'mlflow.db').as_posix()}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (``sqlite:////abs/x.db`` -> /abs/x.db), else None."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def redact(url: str) -> str:
    """A database or server URL without its password (``postgresql://user:***@host/db``)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI that cannot work, with one line saying why (before MLflow tries).

    Raises:
        ConfigError: a malformed SQLite URL, a SQLite folder that does not exist (other than the
            project's own ``mlruns/``, which is created), or an HTTP server that does not answer.
    """
    if uri.startswith("sqlite:") and sqlite_path(uri) is None:
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: expected sqlite:////absolute/path/mlflow.db "
                          "(four slashes for an absolute path)")
    database = sqlite_path(uri)
    if database is not None:
        check_database_folder(database, f"MLFLOW_TRACKING_URI={uri}", create=uri == default_tracking_uri())
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = str(getattr(error, "reason", error))
        # MLflow's client would retry for minutes before saying so.
        raise ConfigError(f"MLFLOW_TRACKING_URI={redact(uri)}: no MLflow tracking server answers at {health} "
                          f"({reason}); start it (scenesweep services start) or correct the address")


def check_database_folder(database: Path, what: str, create: bool = False) -> None:
    """The folder of a SQLite database must be one this process can write.

    MLflow would create every missing folder (even at the filesystem's root) without a word, and
    retry an unwritable one for minutes: the folder is created only when its parent exists (or
    ``create``: the project's own ``mlruns/``), and a new database's folder is checked writable.

    Raises:
        ConfigError: naming ``what`` and the folder.
    """
    folder = database.parent
    if not folder.is_dir():
        if not (create or folder.parent.is_dir()):
            raise ConfigError(f"{what}: folder {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{what}: cannot create folder {folder} ({error.strerror or error})") from None
    if not database.exists():
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ConfigError(f"{what}: cannot create a database in folder {folder} "
                              f"({error.strerror or error.__class__.__name__})") from None


def setup_tracking() -> str:
    """Point MLflow (and every child process) at the project's store; returns the URI.

    Raises:
        ConfigError: the store cannot be used (see ``check_tracking_uri``), or opening it failed
            (an unwritable folder, a database MLflow cannot read).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    check_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        # A new SQLite store is created by scenesweep.mlflow_store (MLflow's store, opened under
        # a file lock so that two workers starting at once do not race on its schema, with the
        # Default experiment's artifacts beside the database), as in every MLflow process here.
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # OperationalError (unwritable folder), a newer schema, ...
        first = (str(getattr(error, "message", error)).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"MLFLOW_TRACKING_URI={redact(uri)}: cannot open the tracking store "
                          f"({error.__class__.__name__}: {first})") from None
    return uri


@contextlib.contextmanager
def sqlite_creation_lock(url: str) -> Iterator[None]:
    """An exclusive file lock beside a SQLite database (no-op for other URLs) while its schema
    is created or migrated, so that concurrent processes do not race on it. Only the project's
    own ``mlruns/`` folder is created when missing."""
    database = sqlite_path(url)
    if database is None:
        yield
        return
    import fcntl

    if not database.parent.is_dir() and database.parent == repo_root() / "mlruns":
        database.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(database.parent / f".{database.name}.lock", "w")
    except OSError as error:
        raise ConfigError(f"{url}: cannot use folder {database.parent} "
                          f"({error.strerror or error.__class__.__name__})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def artifact_root(uri: str | None = None) -> str | None:
    """Artifacts beside a SQLite database (<dir>/artifacts); the server's default otherwise."""
    database = sqlite_path(uri or mlflow.get_tracking_uri())
    if database is not None:
        return (database.parent / "artifacts").resolve().as_uri()
    return None


def source_tags() -> dict[str, str]:
    """The tags a fluent ``mlflow.start_run`` adds (user, source, git commit): for runs made
    with ``MlflowClient.create_run``, which adds none, so the UI would show "Created by -"."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags())


def system_metrics_monitor(run_id: str, node_id: str | None = None):
    """MLflow's system metrics (CPU, memory, GPU with nvidia-ml-py) sampled into ``run_id`` while
    this process works on it; several workers of one run log under their own ``node_id``.

    Returns:
        The started monitor (call ``finish()``), or None where it cannot run.
    """
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
                                       resume_logging=True, node_id=node_id)
        monitor.start()
    except Exception:  # no psutil, or a store that refuses: the sweep goes on without them
        return None
    return monitor


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside the store) when missing."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    root = artifact_root()
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except mlflow.exceptions.MlflowException:
        # Another process created it first.
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, description: str | None = None,
              system_metrics: bool = True) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, re-attach to) a run; ends it FAILED on an exception.

    Under ``mlflow run`` the environment carries MLFLOW_RUN_ID: the project's run is reused and
    the experiment it was launched in is kept.
    """
    launched = os.environ.get("MLFLOW_RUN_ID") if parent_run_id is None else None
    kwargs: dict[str, Any] = {"log_system_metrics": system_metrics, "tags": dict(tags or {})}
    if description:
        kwargs["description"] = description
    if launched:
        run = mlflow.start_run(run_id=launched, **kwargs)
        MlflowClient().set_tag(launched, "mlflow.runName", run_name)
        warn_if_not_in_family(run, experiment)
    else:
        run = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name,
                               nested=parent_run_id is not None, parent_run_id=parent_run_id, **kwargs)
    with run:
        yield run


def warn_if_not_in_family(run: mlflow.ActiveRun, experiment: str) -> None:
    """``mlflow run`` chose the experiment (--experiment-name, else "Default"): runs cannot move,
    so say where this one is and how to file the next one with its family."""
    client = MlflowClient()
    actual = client.get_experiment(run.info.experiment_id).name
    if actual != experiment:
        client.set_tag(run.info.run_id, "scenesweep.family_experiment", experiment)
        print(f"warning: this run is in experiment {actual!r}, not {experiment!r}: "
              f"launch it with mlflow run ... --experiment-name {experiment}", file=sys.stderr)


def command_line() -> str:
    """The command as the user typed it ('scenesweep ...' for `python -m scenesweep`)."""
    program = Path(sys.argv[0]).name
    return " ".join(shlex.quote(a) for a in ["scenesweep" if program == "__main__.py" else program, *sys.argv[1:]])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu") -> dict[str, str]:
    """What a run ran on: CPU, cores, memory, library versions, device; GPU details on CUDA."""
    import torch

    info = {"cpu": cpu_model(), "cpu_cores_logical": str(os.cpu_count()),
            "cpu_cores_physical": str(psutil.cpu_count(logical=False)),
            "torch_threads": str(torch.get_num_threads()),
            "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}", "os": platform.platform(),
            "python": platform.python_version(), "device": device}
    for package in ("torch", "torchvision", "mlflow", "optuna", "scikit-learn", "numpy"):
        info[package] = _version(package)
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": f"{props.total_memory / 2**30:.1f}",
                     "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())})
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    return info


def pip_requirements() -> list[str]:
    """Explicit requirements of logged models (inference would pin torch for a sklearn head)."""
    return [f"{p}=={_version(p)}" for p in PIP_PACKAGES if _version(p) != "not installed"]


def param_value(name: str, value: Any) -> str:
    """Numbers stay plain numbers (the UI's parallel coordinates and charts read them)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def log_batch(run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
              tags: dict[str, Any] | None = None, step: int = 0) -> None:
    """One ``log_batch`` call (40 ms for 1000 points on SQLite against seconds one by one)."""
    now = int(time.time() * 1000)
    client = MlflowClient()
    params = {k: param_value(k, v) for k, v in (params or {}).items()}
    if params:
        # `mlflow run` has already logged the MLproject's parameters as given (e.g. '' for "the
        # study file's value", '32.0'): params are immutable, so a resolved value that differs
        # goes under 'resolved.<name>'.
        logged = client.get_run(run_id).data.params
        params = {(k if k not in logged else f"resolved.{k}"): v for k, v in params.items() if logged.get(k) != v}
        # A resolved value logged before stays (params never change); the same value is not resent.
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
    return {name: value for name, value in config.values.items()}


def unit_tags(config: RunConfig) -> dict[str, str]:
    return {f"unit.{n}": PARAMETER_BY_NAME[n].unit for n in config.values if PARAMETER_BY_NAME[n].unit}


def confusion_figure(confusion: np.ndarray, classes: tuple[str, ...], title: str):
    """Row-normalised confusion matrix as a figure (counts printed in the cells)."""
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict], title: str):
    """Per-epoch loss and accuracy, train and validation."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        if f"{split}/loss" in history[0]:
            ax_loss.plot(epochs, [h[f"{split}/loss"] for h in history], style, label=split)
            ax_acc.plot(epochs, [h[f"{split}/acc"] for h in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_dataset(prepared) -> None:
    """Dataset fingerprint as params; the manifest with each image's split as an artifact."""
    dataset, split = prepared.dataset, prepared.split
    subset = np.empty(len(dataset.paths), dtype=object)
    subset[split.train], subset[split.val], subset[split.test] = "train", "val", "test"
    manifest = {"root": str(dataset.root), "layout": dataset.layout, "classes": list(dataset.classes),
                "fingerprint": dataset.fingerprint, "split_fingerprint": split.fingerprint,
                "sizes": split.sizes(),
                "images": [{**entry, "label": dataset.classes[dataset.labels[i]], "split": subset[i]}
                           for i, entry in enumerate(dataset.manifest)]}
    mlflow.log_dict(manifest, "dataset/manifest.json")


def log_run_context(run_id: str, config: RunConfig, prepared, entry_point: str) -> None:
    """Everything a run logs before fitting: config, dataset, cache, hardware."""
    features = prepared.features
    log_batch(run_id,
              params={**config_params(config), "head": config.head or "none",
                      "dataset_fingerprint": prepared.dataset.fingerprint,
                      "split_fingerprint": prepared.split.fingerprint, "cache_key": features.key,
                      "conv_cache_key": features.conv_key, "precision_resolved": features.precision,
                      "n_classes": len(prepared.dataset.classes),
                      **{f"n_{k}": v for k, v in prepared.split.sizes().items()}},
              tags={"entry_point": entry_point, "cache": "hit" if features.hit else "miss",
                    "conv_cache": features.conv_state, "command": command_line(),
                    **{f"hardware.{k}": v for k, v in hardware(features.device).items()},
                    **unit_tags(config)})
    mlflow.log_dict(config.as_dict(), "config.yaml")
    log_dataset(prepared)


def log_result(run_id: str, result: RunResult, title: str) -> None:
    """Final metrics, timings, plots: everything a run logs after fitting."""
    # Per-epoch metrics are already logged with step = epoch; the last epoch is the run's value.
    per_epoch = set(result.history[-1]) if result.history else set()
    final = {k: v for k, v in result.metrics.items() if k not in per_epoch}
    log_batch(run_id, metrics={**final, **timing_metrics(result.timings)},
              step=len(result.history))
    classes = result.prepared.dataset.classes
    if result.confusion is not None:
        log_figure(confusion_figure(result.confusion, classes, f"{title}: test confusion"),
                   "plots/confusion_matrix.png")
        mlflow.log_dict({"classes": list(classes), "matrix": result.confusion.tolist()}, "confusion_matrix.json")
    if result.history:
        log_figure(curves_figure(result.history, title), "plots/curves.png")


def log_layer_table(config: RunConfig) -> None:
    from .backbone import format_layer_table, layer_table, architecture

    table = format_layer_table(layer_table(architecture(config.arch, config.pooling, config.fc_width),
                                           config.image_size))
    mlflow.log_text(f"# {config.arch} at {config.image_size} px, pooling {config.pooling}, "
                    f"fc width {config.fc_width}\n\n{table}\n", "layer_table.md")


def log_head_model(result: RunResult, name: str = "head") -> str:
    """The fitted head as an MLflow pyfunc model with signature and input example."""
    from .serving import log_head_model as _log

    return _log(result, name)


def run_name(entry_point: str, config: RunConfig) -> str:
    """A name that says what the run is, e.g. 'svm relu7 C=0.1'."""
    if entry_point == "svm":
        return f"svm {config.layer} C={config.C:g}" + ("" if config.fc_width == 4096 else f" fc={config.fc_width}")
    if entry_point == "finetune":
        return f"finetune {config.layer} {config.pooling} h={config.hidden} lr={config.lr:g}"
    return f"{entry_point} {config.layer} {config.pooling} {config.image_size}px"


def track_single_run(entry_point: str, values: dict[str, Any], progress: bool = True,
                     register: str = "") -> tuple[str, RunResult | None]:
    """Run an entry point (extract, svm, finetune) as one tracked MLflow run.

    Bad configuration or data fails before any run is started (one clear error); an error
    during the run ends it FAILED with the error as a tag.

    Returns:
        (run id, result); the result is None for ``extract``.
    """
    from .config import ENTRY_HEADS, make_config
    from .training import check_setting, fit_head, prepare

    config = make_config(ENTRY_HEADS[entry_point], values)
    data = check_setting(config)  # bad data, weights, device or cache folder: before any run
    setup_tracking()
    with start_run(entry_point, run_name(entry_point, config),
                   tags={"scenesweep.entry_point": entry_point}) as run:
        run_id = run.info.run_id
        try:
            log_layer_table(config)
            prepared = prepare(config, progress=progress, data=data)
            log_run_context(run_id, config, prepared, entry_point)
            if config.head is None:
                log_batch(run_id, metrics={**timing_metrics({"extract": prepared.features.extract_timing}),
                                           "features/dim": prepared.features.values.shape[1],
                                           "features/images": prepared.features.values.shape[0]})
                return run_id, None
            result = fit_head(prepared, config, on_epoch=epoch_logger(run_id), evaluate_test=True, progress=progress)
            log_result(run_id, result, run_name(entry_point, config))
            mlflow.set_tag("model.head_uri", log_head_model(result))
            if register:
                from .registry import register_result

                register_result(run_id, result, register)
            return run_id, result
        except BaseException as error:
            mlflow.set_tag("error", f"{error.__class__.__name__}: {error}"[:5000])
            raise
