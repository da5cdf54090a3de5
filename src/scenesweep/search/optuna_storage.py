"""The Optuna storage: which one, opened with heartbeats, and the lock on a study's bookkeeping.

``--storage URL``, else ``OPTUNA_STORAGE`` (Optuna's own variable), else ``optuna.db`` beside the
MLflow SQLite store. No MLflow here.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator, TypeVar

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial

from ..core.errors import ConfigError, first_line
from ..core.store_urls import check_database_folder, project_store_folder, redact, sqlite_creation_lock, sqlite_path
from .optuna_internals import CACHED_STORAGE_CALLS

# Optuna's own INFO lines ("A new study created", "Trial 3 finished") repeat what the sweep
# prints and logs; warnings still show.
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_HEARTBEAT_S = 30
STORAGE_ENV = "OPTUNA_STORAGE"  # Optuna's own variable (its CLI reads it too)
# PostgreSQL: a few connections per worker, checked before use (a restarted server drops them).
POSTGRES_ENGINE = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}
OPEN_ATTEMPTS = 5  # workers starting together on a new database race on its schema: retried
# PostgreSQL gone for a moment (a restart, a failover, the network): each storage call and the
# study lock wait for it this long, then the error stands. Waits between attempts grow to 4 s
# (a trial's heartbeat, retried too, is then late by 4 s at most once the database is back).
OUTAGE_RETRY_S = 180.0
RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0)
T = TypeVar("T")


def default_storage() -> str:
    """``optuna.db`` beside the MLflow SQLite store (so temporary stores stay together)."""
    database = sqlite_path(os.environ.get("MLFLOW_TRACKING_URI", ""))
    folder = database.parent if database is not None else project_store_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').as_posix()}"


def resolve_storage(storage: str | None) -> str:
    """``--storage``, else ``OPTUNA_STORAGE``, else the SQLite default beside the MLflow store."""
    return storage or os.environ.get(STORAGE_ENV) or default_storage()


def is_disconnect(error: BaseException) -> bool:
    """Whether ``error`` says the database went away (the connection was cut or refused, the
    server is shutting down or starting up), not that the statement was wrong. Optuna wraps
    SQLAlchemy's errors in ``StorageInternalError``: its cause is looked at."""
    candidate, seen = error, 0
    while candidate is not None and seen < 4:
        if isinstance(candidate, sqlalchemy.exc.DBAPIError) and (
                candidate.connection_invalidated or isinstance(candidate, sqlalchemy.exc.OperationalError)):
            return True
        # A session whose connection died mid-transaction: a new session (the retry) is clean.
        if isinstance(candidate, sqlalchemy.exc.PendingRollbackError):
            return True
        candidate, seen = candidate.__cause__ or candidate.__context__, seen + 1
    return False


def retry_outage(call: Callable[[], T], what: str) -> T:
    """``call()``, again and again while PostgreSQL is unreachable (``OUTAGE_RETRY_S`` at most).

    Calls are retried as a whole: a write whose COMMIT reached the server just before it went
    away is done twice (a trial marked finished twice fails the second time with
    ``UpdateFinishedTrialError``, which callers already treat as "done by someone else").
    """
    deadline = time.monotonic() + OUTAGE_RETRY_S
    for attempt in itertools.count():
        try:
            return call()
        except Exception as error:
            if not is_disconnect(error) or time.monotonic() >= deadline:
                raise
            if attempt == 0:
                cause = error.__cause__ or error
                first = first_line(str(getattr(cause, "orig", None) or cause), 160)
                print(f"Optuna storage unreachable ({what}: {cause.__class__.__name__}: {first}); "
                      f"retrying for up to {OUTAGE_RETRY_S:.0f} s", file=sys.stderr)
            time.sleep(RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S) - 1)])
    raise AssertionError("unreachable")  # itertools.count() does not end


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose every call survives a short PostgreSQL outage (``retry_outage``).

    SQLite needs none of this (its "database is locked" waits are the driver's ``timeout``).
    """


def _resilient(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def retried(self, *args: Any, **kwargs: Any) -> T:
        return retry_outage(lambda: method(self, *args, **kwargs), method.__name__)

    return retried


# Every call of the storage API that reaches the database (BaseStorage's and the heartbeat's).
for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_id_from_study_id_trial_number", "get_trial_param", "set_trial_state_values",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
              "get_all_trials", "get_best_trial", "get_trial_user_attrs", "get_trial_system_attrs",
              "record_heartbeat", *CACHED_STORAGE_CALLS):
    setattr(ResilientRDBStorage, _name, _resilient(getattr(optuna.storages.RDBStorage, _name)))
del _name


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
    postgres = url.startswith("postgresql")
    engine_kwargs = {"connect_args": {"timeout": 60}} if database is not None else \
        dict(POSTGRES_ENGINE) if postgres else {}
    storage_class = ResilientRDBStorage if postgres else optuna.storages.RDBStorage
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings(), sqlite_creation_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return storage_class(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                     grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=on_stale)
        except Exception as error:  # SQLAlchemy: bad URL, missing driver, unreachable server
            detail = f"{error.__class__.__name__}: {first_line(error)}"
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
    a session advisory lock, released by the server if the worker dies holding it; taking it
    waits out a short outage (``retry_outage``), and a session cut while it is held (a database
    restart) has released it already, so releasing it then is not an error. Other databases:
    none (two workers may then overshoot ``n_trials`` by one trial each).
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
            connection = retry_outage(lambda: _advisory_lock(storage.engine, key), "study lock")
            try:
                yield
            finally:
                try:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
                except Exception as error:
                    if not is_disconnect(error):
                        raise
                finally:
                    connection.close()
        else:
            yield


def _advisory_lock(engine: sqlalchemy.Engine, key: int) -> sqlalchemy.Connection:
    """A pooled connection holding the advisory lock ``key`` (waits while another session holds it)."""
    connection = engine.connect()
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except BaseException:
        connection.close()
        raise
    return connection
