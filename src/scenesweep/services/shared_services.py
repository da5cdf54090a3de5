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

import dataclasses
import importlib.util
import ipaddress
import os
from pathlib import Path
from typing import Callable

import psutil

from . import servers
from .folder import (DEFAULT_HOST, DEFAULT_MLFLOW_PORT, DEFAULT_PG_PORT, MAX_SOCKET_PATH, READY_TIMEOUT_S, ROLE,
                     Services, ServicesError, ServiceStatus, default_dir, ensure_password, folder_paths, locked,
                     probe_host,
                     read_password, read_state, require_folder, write_state)
from .postgres import (postgres_answers, postgres_bin, postmaster_info, require_postgres_user, restart_postgres,
                       start_postgres, stop_postgres)

__all__ = ["Services", "ServiceStatus", "ServicesError", "default_dir", "postgres_bin", "restart_postgres",
           "running_services", "start", "status", "stop"]


@dataclasses.dataclass(frozen=True)
class _HostedServer(servers.Server):
    """A servers.Server probed on ``host`` (servers.Server always probes 127.0.0.1)."""

    host: str = DEFAULT_HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _is_private(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def _mlflow_server(services: Services) -> _HostedServer:
    paths = folder_paths(services.dir)
    # No password here: libpq finds it in PGPASSFILE (see start_mlflow).
    backend = f"postgresql://{ROLE}@{probe_host(services.host)}:{services.pg_port}/mlflow"
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
                         env=(("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),), host=probe_host(services.host))


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether ``pid`` still is the process started at ``started`` (not a pid reused after a
    reboot or a kill)."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - (started or 0)) < 1
    except psutil.Error:
        return False


def _mlflow_pid(directory: Path) -> int | None:
    """The running MLflow server's pid (its process group's id), None when it does not run."""
    state = read_state(directory)
    pid = state.get("mlflow_pid")
    return pid if _alive(pid, state.get("mlflow_started")) else None


def start_mlflow(services: Services, timeout_s: float = READY_TIMEOUT_S) -> int:
    """Start the MLflow server on the services' PostgreSQL and wait until /health answers.
    Returns its pid (the leader of its own process group)."""
    paths = folder_paths(services.dir)
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
    # Every server this folder ever started, so that ``stop`` stops them all, whatever happened.
    started_before = [entry for entry in read_state(services.dir).get("mlflow_servers", []) if _alive(*entry)]
    write_state(services.dir, mlflow_pid=process.pid, mlflow_started=started,
                mlflow_servers=[*started_before, [process.pid, started]])
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
    postmaster, state, password = postmaster_info(directory), read_state(directory), read_password(directory)
    if not (postmaster and _mlflow_pid(directory) and password):
        return None
    return Services(directory, state.get("host", postmaster["host"]), postmaster["port"], state["mlflow_port"],
                    password)


def _refuse_another_address(directory: Path, already, postmaster, given: dict[str, object]) -> None:
    """What runs keeps its address: another one given explicitly (``given``: option -> value) is
    refused, saying what runs."""
    actual = {"--host": postmaster and postmaster["host"], "--pg-port": postmaster and postmaster["port"],
              "--mlflow-port": already and already.mlflow_port}
    for option, value in given.items():
        if actual[option] and value is not None and value != actual[option]:
            raise ServicesError(f"{option} {value}: the services of {directory} already run with "
                                f"{actual[option]}: stop them first (scenesweep services stop --dir {directory})")


def _addresses(directory: Path, postmaster, host: str | None, pg_port: int | None,
               mlflow_port: int | None) -> tuple[str, int, int]:
    """(host, PostgreSQL port, MLflow port) to start with: a server that survived keeps its own;
    otherwise as given, else the last start's, else the defaults when free."""
    state = read_state(directory)
    mlflow_running = _mlflow_pid(directory) is not None
    if postmaster:  # PostgreSQL alone survived (the MLflow server was stopped or killed)
        host, pg_port = postmaster["host"], postmaster["port"]
    else:
        host = host or state.get("host") or DEFAULT_HOST
        pg_port = _choose_port(pg_port, state.get("pg_port"), DEFAULT_PG_PORT, host, "--pg-port",
                               other=state.get("mlflow_port") if mlflow_running else None)
    if mlflow_running:  # the MLflow server alone survived: it keeps its port
        mlflow_port = state["mlflow_port"]
    else:
        mlflow_port = _choose_port(mlflow_port, state.get("mlflow_port"), DEFAULT_MLFLOW_PORT, host,
                                   "--mlflow-port", other=pg_port)
    return host, pg_port, mlflow_port


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
    require_folder(directory, create=False)
    postgres_bin()
    _require_driver()
    if host is not None:
        _require_host(host)
    require_folder(directory, create=True)
    with locked(directory):
        already, postmaster = running_services(directory), postmaster_info(directory)
        _refuse_another_address(directory, already, postmaster, {"--host": host, "--pg-port": pg_port,
                                                                 "--mlflow-port": mlflow_port})
        if already:
            return already, True
        # After a partial outage only what is down starts again, on the same address and ports,
        # so the exports the workers hold stay right.
        mlflow_running = _mlflow_pid(directory) is not None
        host, pg_port, mlflow_port = _addresses(directory, postmaster, host, pg_port, mlflow_port)
        if len(str(directory / "pg" / ".s.PGSQL.65535")) > MAX_SOCKET_PATH:
            raise ServicesError(f"--dir {directory}: too long a path for PostgreSQL's socket inside it "
                                f"(at most {MAX_SOCKET_PATH - 19} characters): pick a shorter one")
        require_postgres_user(directory)
        write_state(directory, host=host, pg_port=pg_port, mlflow_port=mlflow_port)
        if on_start is not None:
            on_start()
        if not postmaster:
            start_postgres(directory, host, pg_port)
        services = Services(directory, host, pg_port, mlflow_port, ensure_password(directory))
        try:
            if not postgres_answers(services):
                raise ServicesError(f"PostgreSQL runs on {host}:{pg_port} but refuses the {ROLE} role's password "
                                    f"from {folder_paths(directory)['passfile']} "
                                    f"(log: {folder_paths(directory)['logs'] / 'postgres.log'})")
            if not mlflow_running:
                start_mlflow(services, timeout_s=timeout_s)
        except BaseException:
            if not postmaster:  # leave nothing half-started behind
                stop_postgres(directory)
            raise
    return services, False


def status(directory: Path) -> list[ServiceStatus]:
    """PostgreSQL's and the MLflow server's pid, address and whether each answers now."""
    directory = Path(directory).absolute()
    require_folder(directory, create=False)
    _require_driver()
    state, postmaster, password = read_state(directory), postmaster_info(directory), read_password(directory)
    host = state.get("host", DEFAULT_HOST)
    pg_port = postmaster["port"] if postmaster else state.get("pg_port", 0)
    services = Services(directory, postmaster["host"] if postmaster else host, pg_port,
                        state.get("mlflow_port", 0), password or "")
    pg_answers = bool(postmaster and password) and postgres_answers(services)
    mlflow_pid = _mlflow_pid(directory)
    mlflow_answers = bool(mlflow_pid) and servers.answers(
        f"http://{probe_host(services.host)}:{services.mlflow_port}/health")
    return [ServiceStatus("postgresql", postmaster["pid"] if postmaster else None,
                          f"{services.address}:{pg_port}" if pg_port else "-", pg_answers),
            ServiceStatus("mlflow", mlflow_pid, services.tracking_uri if services.mlflow_port else "-", mlflow_answers)]


def stop(directory: Path) -> list[str]:
    """Stop the MLflow server's whole process group (uvicorn workers included), then PostgreSQL.
    Returns the names of what was running; stopping stopped services does nothing."""
    directory = Path(directory).absolute()
    require_folder(directory, create=False)
    if not directory.is_dir():
        return []
    stopped = []
    with locked(directory):
        state = read_state(directory)
        recorded = {(state.get("mlflow_pid"), state.get("mlflow_started"))}
        recorded |= {tuple(entry) for entry in state.get("mlflow_servers", [])}
        alive = [pid for pid, started in recorded if _alive(pid, started)]
        for pid in alive:  # every server this folder started (an earlier start's too)
            servers.stop_group(pid)
        if alive:
            stopped.append("mlflow")
        if folder_paths(directory)["state"].exists():
            write_state(directory, mlflow_pid=None, mlflow_started=None, mlflow_servers=[])
        if postmaster_info(directory):
            stop_postgres(directory)
            stopped.append("postgresql")
    return stopped
