"""The ``scenesweep`` click group and what its commands share: options generated from the
parameter table (each in both spellings, ``--image_size`` as MLproject passes it and click's
``--image-size``), and one way of reporting bad input: ``error: ...`` on stderr, exit 2.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from typing import Any, Callable

import click

from ..core.config import PARAMETERS, number
from ..core.errors import RunFailedError, UserError


def option(name: str, *more: str, **kwargs) -> Callable:
    """A click option under its snake_case name (what MLproject entry points pass) and its
    kebab-case twin (click's and MLflow's and Optuna's own spelling): ``--n_trials``, ``--n-trials``."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else []) + list(more)
    return click.option(*names, name, **kwargs)


def parameter_options(names: tuple[str, ...]) -> Callable:
    """click options for the named run parameters (values validated later by make_config)."""

    def decorate(command: Callable) -> Callable:
        for param in reversed([p for p in PARAMETERS if p.name in names]):
            command = option(param.name, default=None, metavar="VALUE",
                             help=f"{param.help} [default: {param.shown_default or param.default}]")(command)
        return command

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user gave (the rest take the defaults). An empty string counts as
    not given: MLproject entry points pass "" for "use the study file's or the default value"."""
    return {k: v for k, v in values.items() if v is not None and v != ""}


def optional_number(name: str, value: str | None, kind: type) -> Any:
    if value in (None, ""):
        return None
    return number(f"--{name}", kind, 0, low_open=True)(value)


def _interrupted(signum: int, frame) -> None:
    """The first SIGINT or SIGTERM stops the work (as Ctrl-C does); those that follow are ignored,
    so that the clean-up (the trial failed and retried, its run KILLED) is not cut short: ``mlflow
    run`` forwards a SIGTERM to its child right after the terminal's SIGINT."""
    from ..tracking.lifecycle import Interrupted

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _die_with_mlflow_run() -> None:
    """Under ``mlflow run`` (Linux): a SIGTERM when the ``mlflow run`` process dies. A scheduler
    that stops it (SIGTERM to one pid) would otherwise leave this child running on its own."""
    from ..tracking.lifecycle import launched_run_id

    if not launched_run_id() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # it died before the call: nothing will be sent
        os.kill(os.getpid(), signal.SIGTERM)


def clean_exit(command: Callable) -> Callable:
    """How every command ends, whatever ends it. Bad input: one clear line on stderr and exit
    status 2, no traceback; a failed run: one line, exit 1; a full disk or an MLflow error: one
    line, exit 2. SIGTERM (a scheduler,
    ``timeout``, systemd, ``mlflow run`` stopped) ends the work as Ctrl-C does: runs KILLED, the
    running trial failed and retried on resume, one line, exit 128 + the signal (143; 130 for
    Ctrl-C)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException  # MLflow takes a second to import: not for --help

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGINT, signal.SIGTERM)} \
            if in_main_thread else {}
        try:
            if in_main_thread:
                _die_with_mlflow_run()
            return command(*args, **kwargs)
        except KeyboardInterrupt as error:
            signum = getattr(error, "signum", signal.SIGINT)
            click.echo(f"interrupted ({signal.Signals(signum).name}): running again resumes "
                       "(an interrupted trial is retried)", err=True)
            sys.exit(128 + signum)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except RunFailedError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except Exception as error:
            from ..core.disk_space import disk_full_message, is_disk_full
            from ..tracking.mlflow_store import store_folder

            if is_disk_full(error):  # the runs were ended in the space of the store's reserve
                click.echo(f"error: {disk_full_message(error, store_folder())}", err=True)
                sys.exit(2)
            if isinstance(error, MlflowException):
                click.echo(f"error: MLflow: {error.message}", err=True)
                sys.exit(2)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Tracked, searchable transfer-learning studies of torchvision backbones (VGG, ResNet, ...) on image folders (MLflow + Optuna)."""
