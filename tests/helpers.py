"""What the tests share besides fixtures: the repository, the image classes the tests draw,
running the CLI (in this process or as a new one) and ``mlflow run``, what a refused command
must print, a JSON POST to a server, and waiting for a condition. Test modules import these from here (``from helpers import ...``), never from conftest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
from PIL import Image

from warm_processes import run_process

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("coast", "forest", "street")
T = TypeVar("T")


def make_image(path: Path, label: int, index: int, mode: str = "L", size: tuple[int, int] = (48, 40)) -> None:
    """A small image whose pattern depends on its class (stripes of a class-specific period)."""
    rng = np.random.default_rng(1000 * label + index)
    width, height = size
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    period = 4 + 6 * label
    pattern = 127 + 100 * np.sin(2 * np.pi * (x + (y if label == 2 else 0)) / period)
    pixels = np.clip(pattern + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def invoke(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in this process (click's runner: the same code path as ``scenesweep ARGS``,
    without 6 to 8 s of imports for a new interpreter); the result looks like a finished process.
    An exception that would have escaped as a traceback is raised here, so the test shows it."""
    from click.testing import CliRunner

    from scenesweep.cli.main import main

    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, list(args), env=env)
    finally:
        os.chdir(previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def run_cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 600,
            process: bool = False) -> subprocess.CompletedProcess:
    """``scenesweep ARGS`` as a user runs it: in this process (``invoke``), or with ``process``
    in a new ``python -m scenesweep`` process (what only a process shows: its exit status as the
    shell sees it, signals, several workers at once), forked from the tests' pre-imported zygote
    (``warm_processes``)."""
    if not process:
        return invoke(*args, env=env, cwd=cwd)
    return run_process([sys.executable, "-m", "scenesweep", *args], cwd=cwd, env={**os.environ, **(env or {})},
                       timeout=timeout)


def run_mlflow_project(entry: str, params: dict[str, object], timeout: int = 900) -> subprocess.CompletedProcess:
    """``mlflow run . -e ENTRY --env-manager local -P k=v ...`` from the repository."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_bin, "run", ".", "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=timeout)


def error_line(result) -> str:
    """The one ``error: ...`` line a refused command prints (exit status 2, no traceback), from a
    finished process or from click's runner."""
    status = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert status == 2, (status, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def assert_clear_error(result, *fragments: str) -> None:
    """Refused with one error line that names each of ``fragments``."""
    line = error_line(result)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def assert_one_error(result, expected: str) -> None:
    """Refused with exactly the line ``error: EXPECTED``."""
    assert error_line(result) == f"error: {expected}"


def post_json(url: str, body: dict) -> tuple[int, dict]:
    """POST ``body`` as JSON; the status and the decoded JSON answer, an error status included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until ``url`` answers 200 (a server's /ping); the test fails, with the end of ``log``, when
    ``process`` exits first or ``timeout_s`` passes."""
    from scenesweep.services import servers

    deadline = time.monotonic() + timeout_s
    while not servers.answers(url):
        assert process.poll() is None, f"exited ({process.returncode}): " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} not answering after {timeout_s:.0f} s: " + log.read_text()[-3000:]
        time.sleep(0.5)


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.3) -> T:
    """``condition()``'s first truthy value within ``timeout`` seconds, else the test fails
    saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:.0f} s")
