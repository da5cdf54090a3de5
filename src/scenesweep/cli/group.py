"""The ``scenesweep`` click group and what its commands share: options generated from the
parameter table (each in both spellings, ``--image_size`` as MLproject passes it and click's
``--image-size``), and one way of reporting bad input: ``error: ...`` on stderr, exit 2.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable

import click

from ..core.config import PARAMETERS
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
                             help=f"{param.help} [default: {param.default}]")(command)
        return command

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user gave (the rest take the defaults). An empty string counts as
    not given: MLproject entry points pass "" for "use the study file's or the default value"."""
    return {k: v for k, v in values.items() if v is not None and v != ""}


def optional_number(name: str, value: str | None, kind: type) -> Any:
    if value in (None, ""):
        return None
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (ValueError, OverflowError):
        raise UserError(f"--{name}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"--{name}={value!r}: expected a positive value")
    return number


def user_errors(command: Callable) -> Callable:
    """Bad input: one clear line on stderr and exit status 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException  # MLflow takes a second to import: not for --help

        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: running again resumes (an interrupted trial is retried)", err=True)
            sys.exit(130)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except RunFailedError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except MlflowException as error:
            click.echo(f"error: MLflow: {error.message}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Tracked, searchable transfer-learning studies of VGG on image folders (MLflow + Optuna)."""
