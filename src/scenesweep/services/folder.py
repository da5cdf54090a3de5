"""The services folder (``DIR``): where everything lives, its state file, its lock, the role's
password, and what workers need to reach the services (``Services``). See ``shared_services``."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shlex
import socket
from pathlib import Path
from typing import Iterator

from ..core.config import repo_root
from ..core.errors import UserError
from . import servers

ROLE = "scenesweep"
DATABASES = ("mlflow", "optuna")
DEFAULT_HOST = servers.LOCALHOST
DEFAULT_PG_PORT = 5432
DEFAULT_MLFLOW_PORT = 5000
# Under root, PostgreSQL runs as this Debian user (it refuses to run as root).
POSTGRES_USER = "postgres"
# Where Debian's postgresql package puts each major version's programs (not on PATH).
DEBIAN_POSTGRES_ROOT = Path("/usr/lib/postgresql")
# MLflow migrates a fresh PostgreSQL database (~50 alembic steps) on its first start: allow more
# than the 10 to 20 s it needs to answer on SQLite.
READY_TIMEOUT_S = 180.0
# A Unix socket path is at most 107 bytes; PostgreSQL's socket is DIR/pg/.s.PGSQL.<port>.
MAX_SOCKET_PATH = 107


class ServicesError(UserError):
    """The services could not be started, checked or stopped; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Services:
    """Where the services of one folder listen, and how workers reach them.

    Attributes:
        dir: the services folder.
        host: the address both servers bind to.
        pg_port: PostgreSQL's TCP port.
        mlflow_port: the MLflow server's port.
        password: the ``scenesweep`` role's password (kept out of repr).
    """

    dir: Path
    host: str
    pg_port: int
    mlflow_port: int
    password: str = dataclasses.field(repr=False)

    @property
    def address(self) -> str:
        """The address other machines use: the bound one, or this machine's main one for 0.0.0.0."""
        return primary_address() if self.host == "0.0.0.0" else self.host

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.address}:{self.mlflow_port}"

    def database_url(self, database: str) -> str:
        """The SQLAlchemy URL of one database, password included (for workers)."""
        return f"postgresql://{ROLE}:{self.password}@{self.address}:{self.pg_port}/{database}"

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL (OPTUNA_STORAGE)."""
        return self.database_url("optuna")

    @property
    def mlflow_database_url(self) -> str:
        return self.database_url("mlflow")

    def exports(self) -> str:
        """The two ``export`` lines a shell can ``eval`` on any machine that reaches ``address``."""
        return (f"export MLFLOW_TRACKING_URI={shlex.quote(self.tracking_uri)}\n"
                f"export OPTUNA_STORAGE={shlex.quote(self.storage_url)}")


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """One service as ``status`` reports it.

    Attributes:
        name: ``postgresql`` or ``mlflow``.
        pid: its (leader's) process id, None when it does not run.
        address: where it listens (or last listened).
        answers: whether it accepted a connection (PostgreSQL) or answered /health (MLflow).
    """

    name: str
    pid: int | None
    address: str
    answers: bool

    @property
    def running(self) -> bool:
        return self.pid is not None


def primary_address() -> str:
    """This machine's address on its default route (what other machines most likely reach), else
    its host name. A UDP "connect" sends nothing: it only asks the kernel for a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: any address with a route would do
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostname()


def default_dir() -> Path:
    return repo_root() / "services"


# --- the folder -------------------------------------------------------------------------------

def folder_paths(directory: Path) -> dict[str, Path]:
    return {"pg": directory / "pg", "passfile": directory / "pgpass", "state": directory / "services.json",
            "logs": directory / "logs", "artifacts": directory / "artifacts", "lock": directory / ".lock"}


def as_root() -> bool:
    return os.geteuid() == 0


def require_folder(directory: Path, create: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ServicesError(f"--dir {directory} is a file: pass a folder (it is created when missing)")
    if not create:
        return
    try:
        # Under root the postgres user must pass through DIR to reach DIR/pg: execute, not read.
        directory.mkdir(mode=0o711 if as_root() else 0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ServicesError(f"--dir {directory}: cannot create it ({error.strerror}): pick another folder") from None


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One start or stop at a time per folder (two shells starting at once would both initdb)."""
    with open(folder_paths(directory)["lock"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state(directory: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(folder_paths(directory)["state"].read_text())
    return {}


def write_state(directory: Path, **values) -> None:
    state = {**read_state(directory), **values}
    path = folder_paths(directory)["state"]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(path)


def read_password(directory: Path) -> str | None:
    """The role's password from DIR/pgpass (``*:*:*:scenesweep:PASSWORD``), None when missing."""
    with contextlib.suppress(OSError):
        for line in folder_paths(directory)["passfile"].read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 5 and fields[3] == ROLE:
                return fields[4]
    return None


def ensure_password(directory: Path) -> str:
    """The stored password, or a new one written to a 0600 file (created with that mode, so it is
    never readable by others, not even for a moment). libpq ignores a password file others can read."""
    password = read_password(directory)
    if password:
        return password
    # URL-safe characters: no quoting needed in a URL, a shell, or the password file's fields.
    password = secrets.token_urlsafe(24)
    path = folder_paths(directory)["passfile"]
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as passfile:
        passfile.write(f"# libpq password file (PGPASSFILE) of the scenesweep services in {directory}\n"
                       f"*:*:*:{ROLE}:{password}\n")
    return password


def probe_host(host: str) -> str:
    """The address to check a server bound to ``host`` from this machine."""
    return servers.LOCALHOST if host == "0.0.0.0" else host
