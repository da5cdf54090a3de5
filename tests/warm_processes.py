"""``python -m scenesweep ...`` processes that start without paying for their imports again.

Why: a new interpreter spends 8.5 s of one core importing what a sweep needs (torch 2.2 s,
torchvision 2.3 s with the torch._dynamo it pulls in, MLflow 1.8 s, scikit-learn and the rest
about 2 s; measured by ``benchmarks/suite_cost.py``), and the tests start about 35 of them:
several workers on one study, kills at chosen moments and resumes. That was a quarter of the
suite's CPU time on 2 cores.

How: each pytest process starts one *zygote* (this file run as a script). It imports those
modules once, and does nothing else: no torch thread pool, no MLflow run, no file open. For every
command it forks a *waiter*, and the waiter forks the process itself, which:
- takes the test's stdin, stdout and stderr (passed over a Unix socket, ``SCM_RIGHTS``), its
  working directory, its environment and its argv;
- runs ``scenesweep``'s ``__main__`` as ``python -m scenesweep`` would (``runpy``), with Python's
  default signal handlers;
- exits as an interpreter does: non-daemon threads joined, ``atexit`` handlers run (MLflow ends
  its runs there), streams flushed, the exit status of ``SystemExit``, and death by SIGINT
  after an uncaught KeyboardInterrupt.
The waiter sends the process's pid, then its exit status and CPU time (its own and that of what
it waited for), back on the same socket.

So it is a real process with its own pid, signals, files, locks, stores and exit status; what it
does not repeat is the interpreter's start-up and the imports. Tests that are about a fresh
interpreter (``mlflow run`` starting one from MLproject, a missing folder seen "in a new
process", the servers) still start one.

``WarmPopen`` is ``subprocess.Popen`` for such a command: same arguments, pipes, ``text``,
``communicate``, ``wait``, ``send_signal``; any other command is started as usual.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

# What a sweep, a single run, promote, predict and serve import (each module pulls in the rest).
PRELOADED = ("scenesweep.cli.main", "scenesweep.cli.run_commands", "scenesweep.cli.model_commands",
             "scenesweep.runs.sweep", "scenesweep.runs.single", "scenesweep.runs.study_outcome",
             "scenesweep.specs.studies", "scenesweep.tracking.sink", "scenesweep.models.promotion",
             "scenesweep.serving.app", "optuna", "sklearn.svm")
MESSAGE_BYTES = 1 << 20  # a command's argv, cwd and environment, as JSON
# The forked processes that ended, and their CPU (user + system) seconds: what
# ``benchmarks/suite_cost.py`` adds to a test's started processes (they are not this process's
# children, so ``os.times`` does not see them).
FORKED = {"processes": 0, "cpu_s": 0.0}
_zygote: subprocess.Popen | None = None
_zygote_socket: Path | None = None
_zygote_lock = threading.Lock()


def is_scenesweep_command(args) -> bool:
    return (isinstance(args, (list, tuple)) and len(args) >= 3 and str(args[0]) == sys.executable
            and list(map(str, args[1:3])) == ["-m", "scenesweep"])


def zygote_socket() -> Path:
    """This pytest process's zygote (started on first use, stopped at exit); its socket."""
    global _zygote, _zygote_socket
    with _zygote_lock:
        if _zygote is None or _zygote.poll() is not None:
            import atexit
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="scenesweep-zygote-"))
            _zygote_socket = folder / "socket"
            log = open(folder / "zygote.log", "w")
            _zygote = subprocess.Popen([sys.executable, __file__, str(_zygote_socket)], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, env=dict(os.environ))
            log.close()
            atexit.register(_stop_zygote, _zygote, folder)
        zygote, path = _zygote, _zygote_socket
    while not path.exists():  # it listens before the imports: a few ms
        if zygote.poll() is not None:
            raise RuntimeError(f"the test zygote exited ({zygote.returncode}); see {path.parent / 'zygote.log'}")
        threading.Event().wait(0.01)
    return path


def _stop_zygote(zygote: subprocess.Popen, folder: Path) -> None:
    import shutil

    if zygote.poll() is None:
        zygote.kill()
        zygote.wait()
    shutil.rmtree(folder, ignore_errors=True)


class WarmPopen(subprocess.Popen):
    """``subprocess.Popen``; a ``[sys.executable, "-m", "scenesweep", ...]`` command is forked
    from the zygote instead of exec'd (see the module's docstring)."""

    _status_socket: socket.socket | None = None

    # Popen.__init__ has made the pipes and hands the child's ends here (Python 3.11's signature).
    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, *rest):
        if shell or preexec_fn is not None or pass_fds or not is_scenesweep_command(args):
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, restore_signals, gid, gids, uid, umask, start_new_session, *rest)
        # -1: inherit this process's own stream, as Popen does.
        streams = [fd if fd != -1 else default for fd, default in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
        request = {"argv": [str(a) for a in args[3:]], "cwd": os.fspath(cwd) if cwd else os.getcwd(),
                   "env": {str(k): str(v) for k, v in (env if env is not None else os.environ).items()},
                   "new_session": bool(start_new_session)}
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            connection.connect(str(zygote_socket()))
            socket.send_fds(connection, [json.dumps(request).encode()], streams)
            reply = connection.recv(MESSAGE_BYTES)
        except BaseException:
            connection.close()
            raise
        finally:
            # The child's ends of the pipes (and /dev/null): it has them now (Popen's own helper).
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        if not reply:
            connection.close()
            raise OSError(f"the test zygote did not start {args!r}")
        self.pid = json.loads(reply)["pid"]
        self._status_socket = connection
        self._child_created = True

    def _read_status(self, timeout: float | None) -> bool:
        """Whether the exit status arrived within ``timeout`` (None: wait for it)."""
        if self._status_socket is None:
            return False
        self._status_socket.settimeout(timeout)
        try:
            message = self._status_socket.recv(MESSAGE_BYTES)
        except (TimeoutError, BlockingIOError):
            return False
        self._status_socket.close()
        self._status_socket = None
        status = json.loads(message) if message else {"returncode": -signal.SIGKILL, "cpu_s": 0.0}
        self.returncode = status["returncode"]
        with _zygote_lock:
            FORKED["processes"] += 1
            FORKED["cpu_s"] += status["cpu_s"]
        return True

    def _internal_poll(self, _deadstate=None, **_unused):
        if self._status_socket is None:
            return super()._internal_poll(_deadstate, **_unused) if self.returncode is None else self.returncode
        if self.returncode is None:
            self._read_status(0)
        return self.returncode

    def _wait(self, timeout):
        if self._status_socket is None:
            return super()._wait(timeout)
        if self.returncode is None and not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def run_process(args, *, timeout: float | None = None, **popen_args) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, ...)`` with ``WarmPopen``."""
    with WarmPopen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   **popen_args) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


# ----------------------------------------------------------------------------------------------
# The zygote's side (this file run as a script).

def _serve(path: str) -> None:
    import ctypes

    # Gone with the pytest process however it ends (a SIGKILL runs no atexit); not inherited by
    # the processes it forks.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Bound and listening under another name, then renamed: a client that sees the path can
    # connect (one that connected between bind and listen was refused).
    server.bind(path + ".binding")
    server.listen(64)
    os.rename(path + ".binding", path)
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    # Waiters are reaped as they end, so that their CPU (and their commands') adds up in this
    # process's children, and in the pytest process's once it stops this one.
    signal.signal(signal.SIGCHLD, _reap_waiters)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C meant for pytest
    while True:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 3)
        if os.fork() == 0:
            server.close()
            _wait_for(connection, json.loads(message), fds)
        connection.close()
        for fd in fds:
            os.close(fd)


def _reap_waiters(signum, frame) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _wait_for(connection: socket.socket, request: dict, fds: list[int]) -> None:
    """The waiter: fork the command, send its pid, then its exit status as Popen reports it."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            connection.close()
            _run(request, fds)
        for fd in fds:
            os.close(fd)
        connection.send(json.dumps({"pid": pid}).encode())
        _, status, usage = os.wait4(pid, 0)
        connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                    "cpu_s": usage.ru_utime + usage.ru_stime}).encode())
    finally:
        os._exit(0)


def _run(request: dict, fds: list[int]) -> None:
    """The command: ``python -m scenesweep ARGV`` in the test's directory, environment and streams."""
    import runpy
    import traceback

    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        # Python's own start-up handlers (SIGINT raises KeyboardInterrupt; SIGPIPE and SIGXFSZ ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-m", *request["argv"]]
        sys.path[0] = os.getcwd()  # as ``python -m`` puts it
        # A new interpreter seeds NumPy's global generator from the OS (Python's ``random`` is
        # reseeded at fork by CPython itself); without this every forked process draws alike.
        import numpy

        numpy.random.seed()
        runpy.run_module("scenesweep", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _finish(code)


def _finish(code: int) -> None:
    """End as the interpreter would: threads, then atexit, then the streams; an uncaught
    KeyboardInterrupt ends the process by SIGINT, as CPython does."""
    import atexit

    try:
        threading._shutdown()  # joins non-daemon threads, as Py_Finalize does first
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve(sys.argv[1])
