"""Study and experiment files as read from disk: small UTF-8 YAML, with limits checked before
anything expands or runs.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError, file_error, first_line


# What a study or experiment file may be: a small text file (a study file is a page of YAML), with
# few aliases (a "billion laughs" file expands exponentially when anything walks it), and strings
# that MLflow can store: a run's description (``mlflow.note.content``, which adds the study name
# and the command) holds at most 20000 characters, and a tag or param value 5000 / 6000.
MAX_FILE_BYTES = 1_000_000
MAX_ALIASES = 20  # a study file needs none; a "billion laughs" needs 80 or so
MAX_DESCRIPTION_CHARS = 16_000
MAX_TEXT_CHARS = 5_000


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses more than ``MAX_ALIASES`` aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); expected a plain file")
        return super().compose_node(parent, index)


def read_text_file(path: Path, what: str) -> str:
    """A small UTF-8 text file, or one ConfigError naming it: missing, a folder or device or pipe,
    larger than ``MAX_FILE_BYTES``, binary or not UTF-8."""
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: {what} file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML {what} file")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a device, a pipe or a broken link); expected a YAML {what} file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; a {what} file is a page of YAML")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes); expected a YAML {what} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                          f"expected a YAML {what} file") from None


def _check_lengths(path: Path, value: Any, key: str = "") -> None:
    """Every string short enough for MLflow to store (the description longer), else the key."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_lengths(path, item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_lengths(path, item, f"{key}[{index}]")
    elif isinstance(value, str):
        limit = MAX_DESCRIPTION_CHARS if key == "description" else MAX_TEXT_CHARS
        if len(value) > limit:
            raise file_error(path, f"{key}: {len(value):,} characters; expected at most {limit:,} "
                                   "(what MLflow stores in a run's description, tag or param)")


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (study and experiment files), read with limits: see
    ``read_text_file``, ``MAX_ALIASES`` and the string lengths, all checked before anything runs.

    Raises:
        ConfigError: naming the file (and the key), when it is not such a file.
    """
    text = read_text_file(path, what.split()[0])
    try:
        raw = yaml.load(text, Loader=_LimitedLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(raw, dict):
        raise file_error(path, f"expected a mapping of {what}")
    _check_lengths(path, raw)
    return raw
