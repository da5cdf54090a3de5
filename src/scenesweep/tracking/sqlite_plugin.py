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

Imported by MLflow at start-up: it imports nothing heavy until a store is opened (the lock is
``scenesweep.core.store_urls.sqlite_creation_lock``, the one every scenesweep process takes).
"""
from __future__ import annotations

from ..core.store_urls import artifacts_beside, sqlite_creation_lock


def tracking_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's SQLAlchemy tracking store, opened under the creation lock, artifacts beside it."""
    # Imported here: MLflow imports this module while it builds its store registries.
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    with sqlite_creation_lock(store_uri):
        return _get_sqlalchemy_store(store_uri, artifact_uri or artifacts_beside(store_uri))


def registry_store(store_uri: str, tracking_uri: str | None = None):
    """MLflow's SQLAlchemy model registry store, opened under the creation lock."""
    from mlflow.tracking._model_registry.utils import _get_sqlalchemy_store

    with sqlite_creation_lock(store_uri):
        return _get_sqlalchemy_store(store_uri)
