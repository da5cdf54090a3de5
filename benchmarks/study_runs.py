"""The study's experiments as processes: their ``scenesweep run`` commands checked
(``--check``, dropping the pass-through options an experiment refuses), each run in its own
process group with its wall time, CPU time and peak RSS measured, and the cache's size.

Part of ``benchmarks/study.py``; it talks to the command line only.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import REPO  # noqa: E402

POLL_S = 0.5  # RSS sampling period of a running experiment


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when missing); files vanishing meanwhile are skipped."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def scenesweep_command() -> list[str]:
    """The ``scenesweep`` console script of this interpreter's environment (else ``python -m scenesweep``)."""
    script = Path(sys.executable).parent / "scenesweep"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scenesweep"]


# --------------------------------------------------------------------------------------------
# Pass-through arguments, checked per experiment
# --------------------------------------------------------------------------------------------

def split_options(args: list[str]) -> list[list[str]]:
    """['--a', '1', '--flag', '--b=2'] -> [['--a', '1'], ['--flag'], ['--b=2']]."""
    groups: list[list[str]] = []
    for token in args:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def option_name(group: list[str]) -> str:
    return group[0][2:].split("=", 1)[0]


# How the CLI names an option it refuses: "error: FILE: --epochs: unknown run parameter ...", or
# click's own "No such option: --x".
REFUSED_OPTION = re.compile(r"(?:: |No such option: )--([A-Za-z][\w-]*)(?::|\b)")


@dataclass
class Stage:
    """One experiment file, its command and what the run of it measured."""

    file: Path
    command: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    check_output: str = ""
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.file.stem


def check_stage(stage: Stage, base: list[str], extra: list[list[str]], env: dict) -> str | None:
    """Build the stage's command; drop the pass-through options its ``--check`` refuses.

    Returns:
        None when the command checks, else the error the check printed.
    """
    kept = [list(g) for g in extra]
    while True:
        command = base + [str(stage.file.relative_to(REPO))] + [t for g in kept for t in g]
        done = subprocess.run(command + ["--check"], env=env, cwd=REPO, capture_output=True, text=True)
        output = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            stage.command, stage.check_output = command, output
            return None
        refused = REFUSED_OPTION.search(output)
        names = [option_name(g) for g in kept]
        if refused and refused.group(1) in names and refused.group(1) != "data":
            index = names.index(refused.group(1))
            stage.dropped.append(" ".join(kept.pop(index)))
            continue
        return output or f"exit status {done.returncode}"


# --------------------------------------------------------------------------------------------
# Running one experiment under measurement
# --------------------------------------------------------------------------------------------

def tree_rss(process) -> int:
    """RSS of a process and all its descendants now (bytes; shared pages counted in each)."""
    import psutil

    total = 0
    try:
        members = [process] + process.children(recursive=True)
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], env: dict, log_path: Path, timeout_s: float | None) -> dict:
    """Run ``command`` (its own process group), output to ``log_path``; wall, CPU and peak RSS.

    The child is reaped with ``os.wait4``, whose rusage gives its CPU time and ru_maxrss (the
    largest single process of its tree); psutil samples the whole tree's RSS every POLL_S.
    Ctrl-C or the timeout stops the whole process group.
    """
    import psutil

    began = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        watched = psutil.Process(child.pid)
        polled_peak, timed_out = 0, False
        try:
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                polled_peak = max(polled_peak, tree_rss(watched))
                if timeout_s and time.perf_counter() - began > timeout_s and not timed_out:
                    timed_out = True
                    os.killpg(child.pid, signal.SIGTERM)
                time.sleep(POLL_S)
        except BaseException:
            with_suppressed_kill(child.pid)
            raise
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    max_rss = usage.ru_maxrss * 1024  # KiB on Linux
    return {"rc": child.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - began,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": max(polled_peak, max_rss),
            "polled_tree_rss_bytes": polled_peak, "max_rss_bytes": max_rss}


def with_suppressed_kill(pid: int) -> None:
    """Stop a child's whole process group (SIGTERM, then SIGKILL) and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.2)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
