"""The MLflow tracking store: which one, checked before use, and the experiments in it.

The tracking URI is MLFLOW_TRACKING_URI when set, else the absolute
``sqlite:////<repo>/mlruns/mlflow.db`` (a relative SQLite path would resolve per process, and
``mlflow run`` children, ``mlflow ui`` and ``mlflow models serve`` could end up on different
databases). Artifacts of the experiments created here live beside the database.
"""
from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ..core.disk_space import check_store_space  # noqa: E402
from ..core.errors import ConfigError, first_line  # noqa: E402
from ..core.store_urls import (artifacts_beside, check_database_folder, project_store_folder, redact,  # noqa: E402
                               sqlite_path)

HEALTH_TIMEOUT_S = 5.0  # a tracking server that does not answer /health in this time is down


def default_tracking_uri() -> str:
    return f"sqlite:///{(project_store_folder() / 'mlflow.db').as_posix()}"


def tracking_uri() -> str:
    """The URI ``setup_tracking`` uses (MLFLOW_TRACKING_URI, else the project's), unchecked."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI that cannot work, with one line saying why (before MLflow tries).

    Raises:
        ConfigError: a malformed SQLite URL, a SQLite folder that does not exist or cannot be
            written (see ``check_database_folder``) or has too little space (``StoreFullError``),
            or an HTTP server that does not answer.
    """
    if uri.startswith("sqlite:") and sqlite_path(uri) is None:
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: expected sqlite:////absolute/path/mlflow.db "
                          "(four slashes for an absolute path)")
    database = sqlite_path(uri)
    if database is not None:
        check_database_folder(database, f"MLFLOW_TRACKING_URI={uri}")
        check_store_space(database.parent, f"MLFLOW_TRACKING_URI={uri}")
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


def setup_tracking() -> str:
    """Point MLflow (and every child process) at the project's store; returns the URI.

    Raises:
        ConfigError: the store cannot be used (see ``check_tracking_uri``), or opening it failed
            (a database MLflow cannot read, a server that refuses).
    """
    uri = tracking_uri()
    check_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # MLflow logs each database error it re-raises with a traceback and the statement's rows
    # (mlflow.store.db.utils), and its system-metrics thread the same as a warning every 10 s:
    # the error itself reaches the caller, whose one line (a full disk, a lost database) says it.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)
    # On a tracking server MLflow prints "View run ... at: URL" on stdout for every run it ends,
    # after one more request to read the run: 2 lines and a round trip per trial of a sweep, on
    # the stdout that holds the summary. The parent run's link and the dashboard notes say where.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    try:
        # A new SQLite store is created by scenesweep.tracking.sqlite_plugin (MLflow's store, opened
        # under a file lock so that two workers starting at once do not race on its schema, with
        # the Default experiment's artifacts beside the database), as in every MLflow process here.
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # OperationalError, a newer schema, ...
        first = first_line(error)
        raise ConfigError(f"MLFLOW_TRACKING_URI={redact(uri)}: cannot open the tracking store "
                          f"({error.__class__.__name__}: {first})") from None
    return uri


def store_folder() -> Path | None:
    """The folder of the SQLite tracking store in use (database, artifacts, reserve), else None."""
    database = sqlite_path(mlflow.get_tracking_uri())
    return database.parent if database is not None else None


def artifact_root(uri: str | None = None) -> str | None:
    """Artifacts beside a SQLite database (<dir>/artifacts); the server's default otherwise."""
    return artifacts_beside(uri or mlflow.get_tracking_uri())


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


def warn_if_not_in_family(run, experiment: str) -> None:
    """``mlflow run`` chose the experiment (--experiment-name, else "Default"): runs cannot move,
    so say where this one is and how to file the next one with its family."""
    client = MlflowClient()
    actual = client.get_experiment(run.info.experiment_id).name
    if actual != experiment:
        client.set_tag(run.info.run_id, "scenesweep.family_experiment", experiment)
        print(f"warning: this run is in experiment {actual!r}, not {experiment!r}: "
              f"launch it with mlflow run ... --experiment-name {experiment}", file=sys.stderr)
