"""The Optuna storage: which one, opened with heartbeats, and the lock on a study's bookkeeping.

``--storage URL``, else ``OPTUNA_STORAGE`` (Optuna's own variable), else ``optuna.db`` beside the
MLflow SQLite store. No MLflow here.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import warnings
from typing import Callable, Iterator

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial

from ..core.errors import ConfigError
from ..core.stores import check_database_folder, project_store_folder, redact, sqlite_creation_lock, sqlite_path

# Optuna's own INFO lines ("A new study created", "Trial 3 finished") repeat what the sweep
# prints and logs; warnings still show.
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_HEARTBEAT_S = 30
STORAGE_ENV = "OPTUNA_STORAGE"  # Optuna's own variable (its CLI reads it too)
# PostgreSQL: a few connections per worker, checked before use (a restarted server drops them).
POSTGRES_ENGINE = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}
OPEN_ATTEMPTS = 5  # workers starting together on a new database race on its schema: retried


def default_storage() -> str:
    """``optuna.db`` beside the MLflow SQLite store (so temporary stores stay together)."""
    database = sqlite_path(os.environ.get("MLFLOW_TRACKING_URI", ""))
    folder = database.parent if database is not None else project_store_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').as_posix()}"


def resolve_storage(storage: str | None) -> str:
    """``--storage``, else ``OPTUNA_STORAGE``, else the SQLite default beside the MLflow store."""
    return storage or os.environ.get(STORAGE_ENV) or default_storage()


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (``on_stale`` is called for each trial whose heartbeat went
    stale); SQLite waits for locks instead of failing at once; PostgreSQL keeps a small pool of
    pre-pinged connections.

    Raises:
        ConfigError: a bad URL, a missing driver, an unreachable server, a folder that does not exist.
    """
    database = sqlite_path(url)
    if url.startswith("sqlite:") and database is None:
        raise ConfigError(f"storage={url!r}: expected sqlite:////absolute/path/optuna.db or a database URL")
    if database is not None:
        check_database_folder(database, f"storage={url!r}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if database is not None else \
        dict(POSTGRES_ENGINE) if url.startswith("postgresql") else {}
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings(), sqlite_creation_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                                  grace_period=2 * heartbeat_s,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as error:  # SQLAlchemy: bad URL, missing driver, unreachable server
            detail = f"{error.__class__.__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            # Another worker creating the schema at this moment (PostgreSQL: UniqueViolation
            # on pg_type, "already exists"): it will have finished shortly.
            if attempt < OPEN_ATTEMPTS and ("already exists" in detail or "UniqueViolation" in detail
                                            or "duplicate key" in detail):
                time.sleep(0.5 * attempt)
                continue
            raise ConfigError(f"storage={redact(url)!r}: cannot open the Optuna storage ({redact(detail)})") from None
    raise AssertionError("unreachable")


_THREAD_LOCK = threading.RLock()  # the threads of one worker (n_jobs > 1) take turns too


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Exclusive access to the study's bookkeeping (budget, parent run, summary) across workers.

    SQLite (one machine): a file lock beside the database. PostgreSQL (any number of machines):
    a session advisory lock, released by the server if the worker dies holding it. Other
    databases: none (two workers may then overshoot ``n_trials`` by one trial each).
    """
    url = str(storage.url)
    database = sqlite_path(url)
    key = int.from_bytes(hashlib.sha256(f"scenesweep:{study_name}".encode()).digest()[:8], "big", signed=True)
    with _THREAD_LOCK:
        if database is not None:
            digest = hashlib.sha256(study_name.encode()).hexdigest()[:16]
            with open(database.parent / f".{database.name}.{digest}.lock", "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
        elif url.startswith("postgresql"):
            with storage.engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
        else:
            yield
