"""The errors a user can cause, and how the CLI reports them.

``UserError`` (and its ``ConfigError``): bad input, printed as one ``error: ...`` line, exit 2.
``RunFailedError``: the work ran but has nothing to show (no trial of a study completed), exit 1.
"""
from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input from the user: the CLI prints the message alone and exits non-zero."""


class ConfigError(UserError):
    """A parameter, file or value is not what was expected; the message says which and why."""


class RunFailedError(RuntimeError):
    """The work ran but produced nothing to show (e.g. no trial of a study completed): the CLI
    prints the message alone and exits 1."""


def file_error(path: str | Path, message: str) -> ConfigError:
    """A ConfigError about one file: ``<path>: <message>`` (study and experiment files)."""
    return ConfigError(f"{path}: {message}")
