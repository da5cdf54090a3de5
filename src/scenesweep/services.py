"""Shared services for a study on several machines: PostgreSQL and an MLflow tracking server.

One folder (``DIR``, default ``<repo>/services``) holds everything:

- ``DIR/pg``: a PostgreSQL cluster from Debian's ``postgresql`` package (initdb on first
  start) with two databases, ``mlflow`` (the tracking server's store) and ``optuna`` (the
  study storage), both owned by the role ``scenesweep``;
- ``DIR/pgpass``: that role's generated password, in libpq's password-file format, mode 0600,
  the only place it is kept;
- ``DIR/artifacts``: the artifacts the MLflow server proxies (``--serve-artifacts``), so workers
  need no shared disk;
- ``DIR/logs``: both servers' output; ``DIR/services.json``: host, ports and the MLflow
  server's pid (never the password).

PostgreSQL refuses to run as root: under root, its commands run as Debian's ``postgres`` user
(``runuser``), which owns ``DIR/pg``. The cluster's superuser (named after whoever runs it) can
only log in through a Unix socket inside ``DIR/pg`` (peer authentication, mode 0700); over TCP
only ``scenesweep`` may log in, to its two databases, with its password (scram-sha-256). The
MLflow server reads the password from ``DIR/pgpass`` (``PGPASSFILE``), so it appears neither on
its command line nor in its log.

This module imports neither MLflow, Optuna nor click; errors are ``ServicesError`` (a
``UserError``), one line naming what is wrong and how to fix it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import pwd
import secrets
import shlex
import socket
import stat
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from . import servers
from .config import UserError, repo_root

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

def _paths(directory: Path) -> dict[str, Path]:
    return {"pg": directory / "pg", "passfile": directory / "pgpass", "state": directory / "services.json",
            "logs": directory / "logs", "artifacts": directory / "artifacts", "lock": directory / ".lock"}


def _as_root() -> bool:
    return os.geteuid() == 0


def _require_folder(directory: Path, create: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ServicesError(f"--dir {directory} is a file: pass a folder (it is created when missing)")
    if not create:
        return
    try:
        # Under root the postgres user must pass through DIR to reach DIR/pg: execute, not read.
        directory.mkdir(mode=0o711 if _as_root() else 0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ServicesError(f"--dir {directory}: cannot create it ({error.strerror}): pick another folder") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One start or stop at a time per folder (two shells starting at once would both initdb)."""
    with open(_paths(directory)["lock"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(directory: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_paths(directory)["state"].read_text())
    return {}


def _write_state(directory: Path, **values) -> None:
    state = {**_read_state(directory), **values}
    path = _paths(directory)["state"]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(path)


def _read_password(directory: Path) -> str | None:
    """The role's password from DIR/pgpass (``*:*:*:scenesweep:PASSWORD``), None when missing."""
    with contextlib.suppress(OSError):
        for line in _paths(directory)["passfile"].read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 5 and fields[3] == ROLE:
                return fields[4]
    return None


def _ensure_password(directory: Path) -> str:
    """The stored password, or a new one written to a 0600 file (created with that mode, so it is
    never readable by others, not even for a moment). libpq ignores a password file others can read."""
    password = _read_password(directory)
    if password:
        return password
    # URL-safe characters: no quoting needed in a URL, a shell, or the password file's fields.
    password = secrets.token_urlsafe(24)
    path = _paths(directory)["passfile"]
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as passfile:
        passfile.write(f"# libpq password file (PGPASSFILE) of the scenesweep services in {directory}\n"
                       f"*:*:*:{ROLE}:{password}\n")
    return password


# --- PostgreSQL -------------------------------------------------------------------------------

def postgres_bin() -> Path:
    """The folder with initdb, pg_ctl and psql: SCENESWEEP_POSTGRES_BIN, else Debian's newest.

    Raises:
        ServicesError: PostgreSQL is not installed.
    """
    configured = os.environ.get("SCENESWEEP_POSTGRES_BIN")
    if configured:
        candidates = [Path(configured)]
    else:
        versions = [p for p in DEBIAN_POSTGRES_ROOT.glob("*/bin") if p.parent.name.isdigit()]
        candidates = sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "psql")):
            return folder
    where = configured or f"{DEBIAN_POSTGRES_ROOT}/*/bin"
    raise ServicesError(f"PostgreSQL is not installed (no initdb, pg_ctl and psql in {where}): run make services, "
                        "or apt-get install postgresql, or set SCENESWEEP_POSTGRES_BIN to the folder holding them")


def _owner_command(command: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if _as_root() else command


def _run_as_owner(command: list[str], what: str, stdin: str | None = None, secret: str | None = None) -> str:
    """Run a PostgreSQL program as the cluster's owner; ServicesError with its output on failure.

    A plain environment and cwd (PG* variables of the caller must not redirect it; under root the
    postgres user may not be able to enter the caller's folder). ``secret`` is masked in errors:
    psql echoes a failing statement.
    """
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    try:
        result = subprocess.run(_owner_command(command), input=stdin, capture_output=True, text=True, cwd="/",
                                env=environment, timeout=120)
    except subprocess.TimeoutExpired:
        raise ServicesError(f"{what} did not finish within 120 s") from None
    if result.returncode:
        output = (result.stderr or result.stdout).strip()
        if secret:
            output = output.replace(secret, "***")
        raise ServicesError(f"{what} failed (exit status {result.returncode}): {output[-800:]}")
    return result.stdout


def _require_postgres_user(directory: Path) -> None:
    """Under root: the postgres user must exist and be able to pass through every parent of DIR."""
    if not _as_root():
        return
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise ServicesError(f"running as root needs the {POSTGRES_USER} user to run PostgreSQL (it refuses root): "
                            "apt-get install postgresql creates it") from None
    for folder in [directory.resolve(), *directory.resolve().parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise ServicesError(f"PostgreSQL runs as the {POSTGRES_USER} user, which cannot enter {folder} "
                                f"(mode {stat.S_IMODE(mode):04o}) on the way to {directory}/pg: "
                                f"pick a --dir elsewhere, or chmod o+x {folder}")


def _chown_to_owner(path: Path) -> None:
    if _as_root():
        entry = pwd.getpwnam(POSTGRES_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(directory: Path) -> None:
    """Create the cluster in DIR/pg: TCP logins only by password (scram-sha-256), the superuser
    only through the socket inside DIR/pg."""
    paths, bin_dir = _paths(directory), postgres_bin()
    data = paths["pg"]
    data.mkdir(mode=0o700, exist_ok=True)
    _chown_to_owner(data)
    _run_as_owner([str(bin_dir / "initdb"), "-D", str(data), "--encoding=UTF8", "--no-locale",
                   "--auth-local=peer", "--auth-host=scram-sha-256", "--no-instructions"], "initdb")
    (data / "pg_hba.conf").write_text(
        "# scenesweep: the cluster's owner through its own socket (DIR/pg, mode 0700); over TCP only the\n"
        f"# {ROLE} role, to its two databases, with its password.\n"
        "local  all  all  peer\n"
        f"host   {','.join(DATABASES)}  {ROLE}  all  scram-sha-256\n")
    quoted = str(data).replace("'", "''")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n# scenesweep: the socket inside the data folder, for the owner only (listen_addresses and\n"
                   "# port are given at every start, see scenesweep/services.py)\n"
                   f"unix_socket_directories = '{quoted}'\nunix_socket_permissions = 0700\n"
                   "password_encryption = scram-sha-256\n")
    _chown_to_owner(data / "pg_hba.conf")


def _postmaster(directory: Path) -> dict | None:
    """The running postmaster of DIR/pg (pid, port, host) from its postmaster.pid, None when it
    does not run (no file, or a stale one left by a crash or a reboot)."""
    import psutil

    try:
        lines = (_paths(directory)["pg"] / "postmaster.pid").read_text().splitlines()
        pid, started, port, host = int(lines[0]), float(lines[2]), int(lines[3]), lines[5].strip()
    except (OSError, ValueError, IndexError):
        return None
    try:
        process = psutil.Process(pid)
        alive = (process.status() != psutil.STATUS_ZOMBIE and process.name() in ("postgres", "postmaster")
                 and abs(process.create_time() - started) < 5)  # not a reused pid after a reboot
    except psutil.Error:
        alive = False
    return {"pid": pid, "port": port, "host": host} if alive else None


def _postgres_answers(services: Services, timeout_s: float = 3.0) -> bool:
    """Whether the role logs in over TCP with its password (what workers do)."""
    import psycopg

    host = _probe_host(services.host)
    try:
        with psycopg.connect(host=host, port=services.pg_port, user=ROLE, password=services.password,
                             dbname="optuna", connect_timeout=max(1, int(timeout_s))) as connection:
            connection.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _ensure_role_and_databases(directory: Path, port: int, password: str) -> None:
    """Create the role and both databases when missing and (re)set the role's password from
    DIR/pgpass, over the owner's socket. The SQL goes on stdin, never a command line, and a
    failing statement is not logged (it would carry the password)."""
    databases = "\n".join(f"SELECT 'CREATE DATABASE {name} OWNER {ROLE}' WHERE NOT EXISTS "
                          f"(SELECT FROM pg_database WHERE datname = '{name}')\\gexec" for name in DATABASES)
    sql = (f"SET log_min_error_statement = panic;\n"
           f"SELECT 'CREATE ROLE {ROLE} LOGIN' WHERE NOT EXISTS "
           f"(SELECT FROM pg_roles WHERE rolname = '{ROLE}')\\gexec\n"
           f"ALTER ROLE {ROLE} LOGIN PASSWORD '{password}';\n{databases}\n")
    _run_as_owner([str(postgres_bin() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                   "-h", str(_paths(directory)["pg"]), "-p", str(port), "-d", "postgres"],
                  "creating the scenesweep role and databases", stdin=sql, secret=password)


def start_postgres(directory: Path, host: str, port: int) -> int:
    """Start DIR/pg's cluster on host:port (initdb first when new) and make sure the role and
    both databases exist. Returns the postmaster's pid; does nothing when it runs already."""
    running = _postmaster(directory)
    if running:
        return running["pid"]
    paths = _paths(directory)
    if not (paths["pg"] / "PG_VERSION").is_file():
        _initdb(directory)
    password = _ensure_password(directory)
    paths["logs"].mkdir(mode=0o711 if _as_root() else 0o700, exist_ok=True)
    log = paths["logs"] / "postgres.log"
    log.touch(mode=0o600)
    _chown_to_owner(log)
    # Bound to --host only; the port is chosen per start, so it goes on the command line.
    _run_as_owner([str(postgres_bin() / "pg_ctl"), "-D", str(paths["pg"]), "-l", str(log), "-w", "-t", "60", "-s",
                   "-o", f"-c listen_addresses={host} -p {port}", "start"],
                  f"starting PostgreSQL on {host}:{port} (log: {log})")
    _ensure_role_and_databases(directory, port, password)
    running = _postmaster(directory)
    if not running:
        raise ServicesError(f"PostgreSQL exited right after it started (its log, {log}, ends with:\n"
                            f"{servers.log_tail(log)})")
    return running["pid"]


def stop_postgres(directory: Path) -> bool:
    """Stop DIR/pg's cluster (fast: open sessions are rolled back). Returns whether it ran."""
    if not _postmaster(directory):
        return False
    _run_as_owner([str(postgres_bin() / "pg_ctl"), "-D", str(_paths(directory)["pg"]), "-m", "fast", "-w",
                   "-t", "60", "-s", "stop"], "stopping PostgreSQL")
    return True


def restart_postgres(directory: Path) -> None:
    """Stop and start PostgreSQL alone, on the same address (the MLflow server reconnects)."""
    state = _read_state(directory)
    stop_postgres(directory)
    start_postgres(directory, state["host"], state["pg_port"])


# --- the MLflow server ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _HostedServer(servers.Server):
    """A servers.Server probed on ``host`` (servers.Server always probes 127.0.0.1)."""

    host: str = DEFAULT_HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _probe_host(host: str) -> str:
    """The address to check a server bound to ``host`` from this machine."""
    return servers.LOCALHOST if host == "0.0.0.0" else host


def _is_private(host: str) -> bool:
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def _mlflow_server(services: Services) -> _HostedServer:
    paths = _paths(services.dir)
    # No password here: libpq finds it in PGPASSFILE (see start_mlflow).
    backend = f"postgresql://{ROLE}@{_probe_host(services.host)}:{services.pg_port}/mlflow"
    command = [servers.console_script("mlflow"), "server", "--backend-store-uri", backend,
               "--artifacts-destination", str(paths["artifacts"]), "--serve-artifacts",
               "--host", services.host, "--port", str(services.mlflow_port), "--workers", "1"]
    # MLflow answers only Host headers of localhost and private addresses by default; a public
    # address or a machine name needs its own (MLFLOW_SERVER_ALLOWED_HOSTS, when set, wins).
    if not _is_private(services.address) and "MLFLOW_SERVER_ALLOWED_HOSTS" not in os.environ:
        port = services.mlflow_port
        command += ["--allowed-hosts", f"{services.address},{services.address}:{port},localhost:{port},"
                                       f"{servers.LOCALHOST}:{port}"]
    # The job runner (huey consumers for GenAI scorers and trace archival) is of no use to track
    # training runs, costs memory on a small machine and takes ~10 s to stop.
    return _HostedServer("MLflow server", tuple(command), services.mlflow_port, "/health",
                         env=(("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),), host=_probe_host(services.host))


def _mlflow_pid(directory: Path) -> int | None:
    """The running MLflow server's pid (its process group's id), None when it does not run."""
    import psutil

    state = _read_state(directory)
    pid, started = state.get("mlflow_pid"), state.get("mlflow_started")
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        # The same process as recorded, not a pid reused after a reboot or a kill.
        if process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < 1:
            return pid
    except psutil.Error:
        pass
    return None


def start_mlflow(services: Services, timeout_s: float = READY_TIMEOUT_S) -> int:
    """Start the MLflow server on the services' PostgreSQL and wait until /health answers.
    Returns its pid (the leader of its own process group)."""
    import psutil

    paths = _paths(services.dir)
    paths["artifacts"].mkdir(exist_ok=True)
    server = _mlflow_server(services)
    log = paths["logs"] / "mlflow.log"
    # The caller's MLFLOW_TRACKING_URI (often the project's SQLite store) must not leak into the
    # server's own clients: point it at the server's database too.
    backend = server.command[server.command.index("--backend-store-uri") + 1]
    process = servers.start(server, log=log, env={"PGPASSFILE": str(paths["passfile"]), "MLFLOW_TRACKING_URI": backend})
    try:
        started = psutil.Process(process.pid).create_time()  # tells it from a pid reused later
    except psutil.Error:
        started = 0.0  # exited at once: wait_until_ready says why
    _write_state(services.dir, mlflow_pid=process.pid, mlflow_started=started)
    try:
        servers.wait_until_ready(server, process, timeout_s=timeout_s, log=log)
    except BaseException:
        servers.stop(process)
        raise
    return process.pid


# --- all of it --------------------------------------------------------------------------------

def _choose_port(given: int | None, last: int | None, default: int, host: str, option: str,
                 other: int | None = None) -> int:
    """``given`` (refused when taken), else the last start's port, else ``default``, when free;
    else one the kernel picks."""
    if given is not None:
        if not 0 < given < 65536:
            raise ServicesError(f"{option} {given}: expected a port number between 1 and 65535")
        if given == other:
            raise ServicesError(f"{option} {given}: PostgreSQL takes that port: pick another {option}")
        if not servers.port_is_free(given, host):
            raise ServicesError(f"{option} {given}: the port is already in use on {host}: "
                                f"stop what listens there or pick another {option}")
        return given
    for port in (last, default):
        if port and port != other and servers.port_is_free(port, host):
            return port
    return servers.free_port(host)


def _require_host(host: str) -> None:
    if not servers.port_is_free(0, host):
        raise ServicesError(f"--host {host}: not an IPv4 address of this machine: pass 127.0.0.1 (this machine "
                            "only), 0.0.0.0 (every interface) or one of its addresses")


def _require_driver() -> None:
    if importlib.util.find_spec("psycopg") is None:
        raise ServicesError("the PostgreSQL driver psycopg (3) is not installed: pip install -e '.[postgres]' "
                            "(make test and make services do)")


def running_services(directory: Path) -> Services | None:
    """The services of DIR when both run, else None."""
    postmaster, state, password = _postmaster(directory), _read_state(directory), _read_password(directory)
    if not (postmaster and _mlflow_pid(directory) and password):
        return None
    return Services(directory, state.get("host", postmaster["host"]), postmaster["port"], state["mlflow_port"],
                    password)


def start(directory: Path, host: str | None = None, pg_port: int | None = None, mlflow_port: int | None = None,
          timeout_s: float = READY_TIMEOUT_S, on_start: Callable[[], None] | None = None) -> tuple[Services, bool]:
    """Start PostgreSQL and the MLflow server of DIR, whichever does not run yet.

    Args:
        directory: the services folder (created when missing).
        host: the address both bind to (default 127.0.0.1; a running service keeps its own).
        pg_port, mlflow_port: ports; default: the last start's, else 5432/5000 when free, else
            any free port.
        timeout_s: how long to wait for the MLflow server to answer.
        on_start: called once the input is checked, before anything starts (to say it takes a while).

    Returns:
        (the services, whether both were running already).

    Raises:
        ServicesError: bad folder, host or port; PostgreSQL or psycopg missing; a server that
            did not start.
    """
    directory = Path(directory).absolute()
    _require_folder(directory, create=False)
    postgres_bin()
    _require_driver()
    if host is not None:
        _require_host(host)
    _require_folder(directory, create=True)
    with _locked(directory):
        already, postmaster = running_services(directory), _postmaster(directory)
        # What runs keeps its address: refuse another one given explicitly.
        actual = {"--host": postmaster and postmaster["host"], "--pg-port": postmaster and postmaster["port"],
                  "--mlflow-port": already and already.mlflow_port}
        for option, given in (("--host", host), ("--pg-port", pg_port), ("--mlflow-port", mlflow_port)):
            if actual[option] and given is not None and given != actual[option]:
                raise ServicesError(f"{option} {given}: the services of {directory} already run with "
                                    f"{actual[option]}: stop them first (scenesweep services stop --dir {directory})")
        if already:
            return already, True
        state = _read_state(directory)
        if postmaster:  # PostgreSQL alone survived (the MLflow server was stopped or killed)
            host, pg_port = postmaster["host"], postmaster["port"]
        else:
            host = host or DEFAULT_HOST
            pg_port = _choose_port(pg_port, state.get("pg_port"), DEFAULT_PG_PORT, host, "--pg-port")
        mlflow_port = _choose_port(mlflow_port, state.get("mlflow_port"), DEFAULT_MLFLOW_PORT, host,
                                   "--mlflow-port", other=pg_port)
        if len(str(directory / "pg" / ".s.PGSQL.65535")) > MAX_SOCKET_PATH:
            raise ServicesError(f"--dir {directory}: too long a path for PostgreSQL's socket inside it "
                                f"(at most {MAX_SOCKET_PATH - 19} characters): pick a shorter one")
        _require_postgres_user(directory)
        _write_state(directory, host=host, pg_port=pg_port, mlflow_port=mlflow_port)
        if on_start is not None:
            on_start()
        start_postgres(directory, host, pg_port)
        services = Services(directory, host, pg_port, mlflow_port, _ensure_password(directory))
        try:
            if not _postgres_answers(services):
                raise ServicesError(f"PostgreSQL runs on {host}:{pg_port} but refuses the {ROLE} role's password "
                                    f"from {_paths(directory)['passfile']} "
                                    f"(log: {_paths(directory)['logs'] / 'postgres.log'})")
            start_mlflow(services, timeout_s=timeout_s)
        except BaseException:
            if not postmaster:  # leave nothing half-started behind
                stop_postgres(directory)
            raise
    return services, False


def status(directory: Path) -> list[ServiceStatus]:
    """PostgreSQL's and the MLflow server's pid, address and whether each answers now."""
    directory = Path(directory).absolute()
    _require_folder(directory, create=False)
    _require_driver()
    state, postmaster, password = _read_state(directory), _postmaster(directory), _read_password(directory)
    host = state.get("host", DEFAULT_HOST)
    pg_port = postmaster["port"] if postmaster else state.get("pg_port", 0)
    services = Services(directory, postmaster["host"] if postmaster else host, pg_port,
                        state.get("mlflow_port", 0), password or "")
    pg_answers = bool(postmaster and password) and _postgres_answers(services)
    mlflow_pid = _mlflow_pid(directory)
    mlflow_answers = bool(mlflow_pid) and servers.answers(
        f"http://{_probe_host(services.host)}:{services.mlflow_port}/health")
    return [ServiceStatus("postgresql", postmaster["pid"] if postmaster else None,
                          f"{services.address}:{pg_port}" if pg_port else "-", pg_answers),
            ServiceStatus("mlflow", mlflow_pid, services.tracking_uri if services.mlflow_port else "-", mlflow_answers)]


def stop(directory: Path) -> list[str]:
    """Stop the MLflow server's whole process group (uvicorn workers included), then PostgreSQL.
    Returns the names of what was running; stopping stopped services does nothing."""
    directory = Path(directory).absolute()
    _require_folder(directory, create=False)
    if not directory.is_dir():
        return []
    stopped = []
    with _locked(directory):
        pid = _mlflow_pid(directory)
        if pid:
            servers.stop_group(pid)
            stopped.append("mlflow")
        if _paths(directory)["state"].exists():
            _write_state(directory, mlflow_pid=None, mlflow_started=None)
        if _postmaster(directory):
            stop_postgres(directory)
            stopped.append("postgresql")
    return stopped
