"""The PostgreSQL cluster of a services folder (Debian's ``postgresql`` package): initdb, start,
stop, the role and its two databases. Under root its commands run as the ``postgres`` user."""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import psutil

from . import servers
from .folder import (DATABASES, DEBIAN_POSTGRES_ROOT, POSTGRES_USER, ROLE, Services, ServicesError, as_root,
                     ensure_password, folder_paths, probe_host, read_state)

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
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if as_root() else command


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


def require_postgres_user(directory: Path) -> None:
    """Under root: the postgres user must exist and be able to pass through every parent of DIR."""
    if not as_root():
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
    if as_root():
        entry = pwd.getpwnam(POSTGRES_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(directory: Path) -> None:
    """Create the cluster in DIR/pg: TCP logins only by password (scram-sha-256), the superuser
    only through the socket inside DIR/pg."""
    paths, bin_dir = folder_paths(directory), postgres_bin()
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


def postmaster_info(directory: Path) -> dict | None:
    """The running postmaster of DIR/pg (pid, port, host) from its postmaster.pid, None when it
    does not run (no file, or a stale one left by a crash or a reboot)."""
    try:
        lines = (folder_paths(directory)["pg"] / "postmaster.pid").read_text().splitlines()
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


def _remove_stale_lock(lock: Path) -> None:
    """Remove a lock file (postmaster.pid, or a socket's .s.PGSQL.PORT.lock; both start with
    the postmaster's pid) whose process is gone, a zombie or not PostgreSQL: a killed postmaster
    not yet reaped by its new parent, a pid reused after a reboot. PostgreSQL itself only checks
    that the pid exists, and refuses to start while a zombie holds it; a container's init may
    take seconds to reap one (this VM's: 1.7 to 1.9 s, measured on a killed child of pid 1).
    Called once ``postmaster_info`` found no live postmaster; a live PostgreSQL process under
    that pid is left to pg_ctl."""
    try:
        pid = int(lock.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        process = psutil.Process(pid)
        stale = process.status() == psutil.STATUS_ZOMBIE or process.name() not in ("postgres", "postmaster")
    except psutil.NoSuchProcess:
        stale = True
    except psutil.Error:
        stale = False
    if stale:
        lock.unlink(missing_ok=True)


def postgres_answers(services: Services, timeout_s: float = 3.0) -> bool:
    """Whether the role logs in over TCP with its password (what workers do)."""
    import psycopg  # the optional postgres extra: a missing driver is reported, not an ImportError

    host = probe_host(services.host)
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
                   "-h", str(folder_paths(directory)["pg"]), "-p", str(port), "-d", "postgres"],
                  "creating the scenesweep role and databases", stdin=sql, secret=password)


MAX_CONNECTIONS = 300  # about 70 workers


def start_postgres(directory: Path, host: str, port: int) -> int:
    """Start DIR/pg's cluster on host:port (initdb first when new) and make sure the role and
    both databases exist. Returns the postmaster's pid; does nothing when it runs already."""
    running = postmaster_info(directory)
    if running:
        return running["pid"]
    paths = folder_paths(directory)
    for lock in (paths["pg"] / "postmaster.pid", *paths["pg"].glob(".s.PGSQL.*.lock")):
        _remove_stale_lock(lock)
    if not (paths["pg"] / "PG_VERSION").is_file():
        _initdb(directory)
    password = ensure_password(directory)
    paths["logs"].mkdir(mode=0o711 if as_root() else 0o700, exist_ok=True)
    log = paths["logs"] / "postgres.log"
    log.touch(mode=0o600)
    _chown_to_owner(log)
    # Bound to --host only; the port is chosen per start, so it goes on the command line.
    # Connections: each worker holds at most 4 (search.optuna_storage.POSTGRES_ENGINE) and the MLflow
    # server up to 15 (SQLAlchemy's 5 + 10): the default 100 would cap a study at ~20 workers.
    _run_as_owner([str(postgres_bin() / "pg_ctl"), "-D", str(paths["pg"]), "-l", str(log), "-w", "-t", "60", "-s",
                   "-o", f"-c listen_addresses={host} -p {port} -c max_connections={MAX_CONNECTIONS}", "start"],
                  f"starting PostgreSQL on {host}:{port} (log: {log})")
    _ensure_role_and_databases(directory, port, password)
    running = postmaster_info(directory)
    if not running:
        raise ServicesError(f"PostgreSQL exited right after it started (its log, {log}, ends with:\n"
                            f"{servers.log_tail(log)})")
    return running["pid"]


def stop_postgres(directory: Path) -> bool:
    """Stop DIR/pg's cluster (fast: open sessions are rolled back). Returns whether it ran."""
    if not postmaster_info(directory):
        return False
    _run_as_owner([str(postgres_bin() / "pg_ctl"), "-D", str(folder_paths(directory)["pg"]), "-m", "fast", "-w",
                   "-t", "60", "-s", "stop"], "stopping PostgreSQL")
    return True


def restart_postgres(directory: Path, down_s: float = 0.0) -> None:
    """Stop and start PostgreSQL alone, on the same address (the MLflow server reconnects);
    ``down_s``: seconds it stays down in between (an outage, as a failover or a reboot makes)."""
    state = read_state(directory)
    stop_postgres(directory)
    time.sleep(down_s)
    start_postgres(directory, state["host"], state["pg_port"])
