"""MLflow store plugins for ``sqlite:`` URIs: MLflow's own stores, made safe to open together.

Registered in ``pyproject.toml`` (entry points ``mlflow.tracking_store`` and
``mlflow.model_registry_store``), so every MLflow process of this environment uses them:
``mlflow run``, ``mlflow ui``, ``mlflow models serve`` and our own commands. They change two
things and nothing else:

* A new SQLite database is created under a file lock. MLflow's SQLite stores run the schema
  migrations of a new database without one, so two ``mlflow run`` commands started together on a
  fresh store crash (``duplicate column name``, ``table ... already exists``).
* Artifacts default to ``artifacts/`` beside the database instead of ``./mlruns`` in the current
  folder: with ``MLFLOW_TRACKING_URI`` naming a scratch store, ``mlflow run`` would otherwise
  write the run's artifacts into the checkout. A server's ``--default-artifact-root`` still wins.

Imported by MLflow at start-up: it imports nothing heavy until a store is opened.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator


def _database(store_uri: str) -> Path | None:
    if not store_uri.startswith("sqlite:///"):
        return None
    return Path(store_uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def creation_lock(store_uri: str) -> Iterator[None]:
    """The lock ``scenesweep.tracking.sqlite_creation_lock`` takes too (the same file), held
    while a store is opened; a no-op when the folder does not exist (MLflow then says so)."""
    database = _database(store_uri)
    if database is None or not database.parent.is_dir():
        yield
        return
    try:
        handle = open(database.parent / f".{database.name}.lock", "w")
    except OSError:  # a read-only folder: no one can create the database there anyway
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def default_artifact_root(store_uri: str) -> str | None:
    database = _database(store_uri)
    return (database.parent / "artifacts").resolve().as_uri() if database is not None else None


def tracking_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's SQLAlchemy tracking store, opened under the creation lock, artifacts beside it."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    with creation_lock(store_uri):
        return _get_sqlalchemy_store(store_uri, artifact_uri or default_artifact_root(store_uri))


def registry_store(store_uri: str, tracking_uri: str | None = None):
    """MLflow's SQLAlchemy model registry store, opened under the creation lock."""
    from mlflow.tracking._model_registry.utils import _get_sqlalchemy_store

    with creation_lock(store_uri):
        return _get_sqlalchemy_store(store_uri)
