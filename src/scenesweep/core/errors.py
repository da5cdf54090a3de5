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


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error's message (or of a text), cut at ``limit``: enough to
    say what went wrong in one line; the whole message belongs in a log or an artifact."""
    text = str(getattr(error, "message", None) or error) if isinstance(error, BaseException) else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


def describe_error(error: BaseException, limit: int = 5000) -> str:
    """'ValueError: message', cut at ``limit`` (MLflow keeps a tag value up to 5000 characters)."""
    return f"{error.__class__.__name__}: {error}"[:limit]
