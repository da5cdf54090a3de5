"""Where the stores live: SQLite paths, URLs without passwords, the folder checks and the file
lock under which a new SQLite database is created.

No MLflow and no Optuna here: the tracking layer, the Optuna storage, the servers and the MLflow
store plugin all read store URLs the same way through these functions.
"""
from __future__ import annotations

import contextlib
import fcntl
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator

from .config import repo_root
from .errors import ConfigError


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (``sqlite:////abs/x.db`` -> /abs/x.db), else None."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(url[len("sqlite:///"):].split("?", 1)[0]))


def artifacts_beside(url: str) -> str | None:
    """The artifact root of a SQLite store: ``artifacts/`` beside its database, as a file URI
    (None for other stores: a tracking server decides its own)."""
    database = sqlite_path(url)
    return (database.parent / "artifacts").resolve().as_uri() if database is not None else None


def redact(url: str) -> str:
    """A database or server URL without its password (``postgresql://user:***@host/db``)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def project_store_folder() -> Path:
    """``<repo>/mlruns``: the project's own stores (created when missing, unlike others')."""
    return repo_root() / "mlruns"


def check_database_folder(database: Path, what: str) -> None:
    """The folder of a SQLite database must be one this process can write.

    MLflow would create every missing folder (even at the filesystem's root) without a word, and
    retry an unwritable one for minutes: the folder is created only when its parent exists (or
    it is the project's own ``mlruns/``), and a new database's folder is checked writable.

    Raises:
        ConfigError: naming ``what`` and the folder.
    """
    folder = database.parent
    if not folder.is_dir():
        if not (folder == project_store_folder() or folder.parent.is_dir()):
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


def lock_path(database: Path) -> Path:
    """The lock file beside a database: taken while its schema is created (by every process)."""
    return database.parent / f".{database.name}.lock"


@contextlib.contextmanager
def sqlite_creation_lock(url: str) -> Iterator[None]:
    """An exclusive file lock beside a SQLite database (a no-op for other URLs, or where the
    folder cannot hold one) while its schema is created or migrated, so that concurrent
    processes do not race on it."""
    database = sqlite_path(url)
    if database is None or not database.parent.is_dir():
        yield
        return
    try:
        handle = open(lock_path(database), "w")
    except OSError:  # a read-only folder: no one can create the database there anyway
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
