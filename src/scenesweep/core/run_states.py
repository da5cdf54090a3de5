"""How a run or trial ended, as names: MLflow's run statuses the project sets, and the kinds of
failure it tags (an MLflow run's ``failure`` tag, a trial's Optuna user attribute ``failure``).

StrEnums: MLflow's and Optuna's APIs take them as the strings they are. No MLflow, Optuna or click.
"""
from __future__ import annotations

import enum


class Status(enum.StrEnum):
    """MLflow's run statuses the project sets (a StrEnum: MLflow's APIs take it as the string)."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class Failure(enum.StrEnum):
    """What a run that did not finish died of: its ``failure`` tag (and a trial's Optuna user
    attribute), filterable in the runs table (``tags.failure = 'killed'``)."""

    PRUNED = "pruned"
    KILLED = "killed"  # its process died, found on its host
    STALE = "stale"  # its process died, found by its heartbeat going stale
    ERROR = "error"  # bad input, a bug, a full disk
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM
