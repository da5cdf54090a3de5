"""Named moments at which a test kills this process, to show that every store write is
idempotent on resume: ``SCENESWEEP_KILL_AT=<moment>`` makes the process SIGKILL itself there (as
a scheduler, the OOM killer or a power cut would), and the test runs the same command again.

A no-op unless the variable names the moment; the moments are listed in ``MOMENTS``.
"""
from __future__ import annotations

import os
import signal

KILL_ENV = "SCENESWEEP_KILL_AT"
MOMENTS = (
    "study-enqueue",      # the study created, its first own setting enqueued, not the others
    "parent-created",     # the parent run made, the study not yet pointing to it
    "trial-run-ended",    # a trial's run ended FINISHED, Optuna not yet told
    "version-registered",  # the model version written, its description and alias not yet
    "cache-write",        # a cache entry's temporary file written, not yet renamed into place
)


def moment(name: str) -> None:
    """Die here (SIGKILL) when ``SCENESWEEP_KILL_AT`` names this moment."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
