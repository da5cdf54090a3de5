"""Local web servers for browsing the stores: the MLflow UI and optuna-dashboard.

Each server runs as a child process in its own session, so its whole process group (``mlflow
ui`` runs uvicorn as a child) can be stopped at once, and a Ctrl-C in the terminal reaches only
the ``scenesweep`` process, which then stops the group.
Servers bind to 127.0.0.1 only. This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil

from ..core.errors import UserError

LOCALHOST = "127.0.0.1"
# `mlflow ui` answers /health after 10 to 20 s on 2 busy cores; optuna-dashboard after 2 to 5 s.
DEFAULT_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


class ServerError(UserError):
    """A server could not be served: its port is taken, or it exited or did not answer."""


@dataclasses.dataclass(frozen=True)
class Server:
    """How to start one web server and how to know it is up.

    Attributes:
        title: what it is, for messages ("MLflow UI").
        command: the command line that starts it.
        port: the port it listens on, on 127.0.0.1.
        health_path: a path that answers 200 once it serves requests.
        env: environment variables it needs beyond ours (ours win: a user can override them).
    """

    title: str
    command: tuple[str, ...]
    port: int
    health_path: str
    env: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether a server could listen on host:port now (as uvicorn and wsgiref bind, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(port: int, title: str, option: str = "--port") -> None:
    """Raises ServerError naming the port when something already listens on it."""
    if not 0 < port < 65536:
        raise ServerError(f"{option} {port}: expected a port number between 1 and 65535")
    if not port_is_free(port):
        raise ServerError(f"port {port} on {LOCALHOST} is already in use (another {title}?): "
                          f"stop it or pick another with {option}")


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def console_script(name: str) -> str:
    """The path of an installed command: beside this interpreter first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ServerError(f"{name} is not installed: pip install -e . in this environment")
    return found


def mlflow_ui(tracking_uri: str, port: int, workers: int = 1, artifact_root: str | None = None) -> Server:
    """``mlflow ui`` on the tracking store ``tracking_uri``, on 127.0.0.1:``port``.

    Args:
        tracking_uri: the backend store (``sqlite:////abs/mlflow.db``, a database URL).
        port: port to listen on.
        workers: uvicorn worker processes (1 starts quickest and serves one user well).
        artifact_root: where experiments created in the UI keep artifacts, and where proxied
            artifact requests resolve (for a SQLite store: ``artifacts/`` beside the database,
            as ``scenesweep.tracking.artifact_root`` gives). Existing experiments keep their own.
    """
    command = [console_script("mlflow"), "ui", "--backend-store-uri", tracking_uri,
               "--host", LOCALHOST, "--port", str(port), "--workers", str(workers)]
    if artifact_root:
        command += ["--default-artifact-root", artifact_root, "--artifacts-destination", artifact_root]
    # The job runner (7 huey consumers, for GenAI scorers and trace archival) is of no use to
    # browse training runs, costs memory on a small machine, and takes ~10 s to stop.
    return Server("MLflow UI", tuple(command), port, "/health",
                  env=(("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),))


def model_server(model_uri: str, port: int) -> Server:
    """``mlflow models serve`` of ``model_uri`` in this environment (``--env-manager local``), on
    127.0.0.1:``port``. It starts uvicorn by name: this environment's bin folder goes first on PATH."""
    mlflow = console_script("mlflow")
    path = f"{Path(mlflow).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return Server("MLflow model server", (mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local",
                                          "-h", LOCALHOST, "-p", str(port)), port, "/ping", env=(("PATH", path),))


def optuna_dashboard(storage_url: str, port: int) -> Server:
    """optuna-dashboard on the Optuna storage ``storage_url``, on 127.0.0.1:``port``.

    The single-process threaded wsgiref server: no gunicorn master, workers or control socket
    to clean up, and plenty for one user.
    """
    command = [console_script("optuna-dashboard"), storage_url, "--host", LOCALHOST, "--port", str(port),
               "--server", "wsgiref"]
    return Server("optuna-dashboard", tuple(command), port, "/api/meta")


def log_path(server: Server, folder: Path | None = None) -> Path:
    """Where the server's own output goes (its access log would flood the terminal): ``folder``
    (beside the store it serves) or the temporary folder, one file per server and port."""
    slug = server.title.lower().replace(" ", "-")
    return (folder or Path(tempfile.gettempdir())) / f"scenesweep-{slug}-{server.port}.log"


def start(server: Server, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``server`` in a new session (its own process group); output goes to ``log``."""
    log = log or log_path(server)
    log.parent.mkdir(parents=True, exist_ok=True)
    # Ours win over the server's defaults (a user can override them), but a server's PATH is
    # its own: the environment's bin folder first.
    environment = {**dict(server.env), "MLFLOW_DISABLE_TELEMETRY": "true", **os.environ, **(env or {})}
    environment.update({k: v for k, v in server.env if k == "PATH"})
    with open(log, "wb") as output:
        return subprocess.Popen(server.command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                env=environment, start_new_session=True)


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(log: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_until_ready(server: Server, process: subprocess.Popen, timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                     log: Path | None = None) -> None:
    """Poll the health path until it answers 200.

    Raises:
        ServerError: the server exited first (its last output lines follow), or ``timeout_s`` passed.
    """
    log = log or log_path(server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"the {server.title} exited with status {process.returncode} before it answered "
                              f"(its log, {log}, ends with:\n{log_tail(log)})")
        if answers(server.url + server.health_path):
            return
        time.sleep(0.5)
    raise ServerError(f"the {server.title} did not answer {server.url}{server.health_path} within "
                      f"{timeout_s:.0f} s (log: {log})")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after ``timeout_s``."""
    pgid = process.pid  # the leader of its own session: its pid is the group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    # The leader may be gone while its children (uvicorn, the job runner) still shut down.
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


@contextlib.contextmanager
def _signal_handlers(handler, signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_termination() -> contextlib.AbstractContextManager:
    """Raise KeyboardInterrupt on Ctrl-C, SIGTERM and SIGHUP, so every way of ending
    ``scenesweep ui`` stops the server group too. SIGINT is set explicitly: a process started
    in the background of a non-interactive shell inherits it ignored."""
    return _signal_handlers(_interrupt, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def ignoring_interrupts() -> contextlib.AbstractContextManager:
    """Ignore Ctrl-C (and SIGTERM, SIGHUP) while a server group is being stopped: a second
    Ctrl-C must not leave it half-stopped."""
    return _signal_handlers(signal.SIG_IGN, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def serve_until_interrupted(server: Server, log: Path | None = None, on_ready: Callable[[], None] | None = None,
                            timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
    """Run ``server`` in the foreground until Ctrl-C (or SIGTERM/SIGHUP), then stop its group.

    Args:
        server: what to run.
        log: where its output goes (default: ``log_path(server)``).
        on_ready: called once it answers (to print the address).
        timeout_s: how long to wait for it to answer.

    Raises:
        ServerError: it exited before answering, did not answer in time, or exited by itself.
    """
    log = log or log_path(server)
    with interrupt_on_termination():
        process = start(server, log=log)
        try:
            wait_until_ready(server, process, timeout_s=timeout_s, log=log)
            if on_ready is not None:
                on_ready()
            status = process.wait()
            raise ServerError(f"the {server.title} exited by itself with status {status} "
                              f"(its log, {log}, ends with:\n{log_tail(log)})")
        except KeyboardInterrupt:
            return
        finally:
            with ignoring_interrupts():
                stop(process)


def group_members(pgid: int) -> list:
    """The live (not zombie) processes of process group ``pgid``, as psutil.Process objects.

    A server started by an earlier ``scenesweep`` process is no child of ours: when it exits it
    may linger as a zombie until init reaps it, and ``os.killpg(pgid, 0)`` still finds zombies.
    """
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_group(pgid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop process group ``pgid`` (a server started by another process, so no Popen to wait on):
    SIGTERM, then SIGKILL to whatever is left after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it when it is our child after all
            os.waitpid(pgid, os.WNOHANG)
        if not group_members(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, 0)
