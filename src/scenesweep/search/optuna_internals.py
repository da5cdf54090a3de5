"""The private parts of Optuna the project uses, and only here: each says why no public API does.

Checked on Optuna 5.0.0 (the version pyproject.toml pins; 4.x has the same names). An Optuna
upgrade that renames one of them breaks this module alone, and tests/test_sweep_workers.py and
tests/test_kill_moments.py (heartbeats, dead workers, retries) say so at once.
"""
from __future__ import annotations

import contextlib

import optuna
from optuna.trial import FrozenTrial

CHECKED_ON = "5.0.0"

# The storage methods Optuna's _CachedStorage (what a Study holds) calls directly, beside the
# public BaseStorage API: search.optuna_storage retries all of them through database outages.
CACHED_STORAGE_CALLS = ("_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id",
                        "_get_stale_trial_ids")


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: heartbeats, and state changes of a trial this worker does not hold
    as an ``optuna.Trial`` (another worker's dead trial), go through the storage API; a Study
    exposes no public handle to it."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of the study: a parent run names it (a study deleted and made again
    under the same name is another study, with another id); Study has no public id."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (its number is per study): every storage call takes it, and
    Trial and FrozenTrial keep it private."""
    return trial._trial_id


def stale_trial_ids(study: optuna.Study) -> set[int]:
    """The running trials whose heartbeat is stale. ``optuna.storages.fail_stale_trials`` fails
    them without saying which; the project marks each one's failure kind first ('stale'), while
    it can still be written. Empty for storages without heartbeats."""
    with contextlib.suppress(AttributeError, NotImplementedError):
        return set(storage_of(study)._get_stale_trial_ids(study_id(study)))
    return set()


def live_system_attrs(trial: optuna.Trial) -> dict:
    """A running trial's system attributes as stored now (``Trial.system_attrs`` is deprecated
    and may be cached): whether Optuna enqueued its parameters."""
    return storage_of(trial.study).get_trial(trial_id(trial)).system_attrs
