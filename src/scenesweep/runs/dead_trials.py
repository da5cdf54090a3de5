"""What a sweep does with a trial whose process died: its MLflow run ended FAILED with why, its
parameters retried, or, when its work had finished, its result kept (``finished_value``).
"""
from __future__ import annotations

import math

import mlflow
import optuna
from optuna.trial import FrozenTrial

from ..core.run_states import Failure, Status
from ..search.trials import USER_ATTR_RUN_ID, own_record, retry
from ..specs.studies import StudySpec
from ..tracking import lifecycle


def mark_dead(study: optuna.Study, trial: FrozenTrial, why: str, failure: str) -> None:
    """A trial whose process died or was interrupted: its MLflow run FAILED (unless it ended) with
    ``failure`` (killed, stale, interrupted), its parameters enqueued again."""
    worker = own_record(trial)
    run_id = trial.user_attrs.get(USER_ATTR_RUN_ID) if worker else None
    if run_id:
        lifecycle.end_run(run_id, Status.FAILED, f"process {worker.get('host')}:{worker.get('pid')} {why}; "
                          "parameters retried", failure=failure, only_running=True)
    retry(study, trial)


def finished_value(spec: StudySpec):
    """For a dead trial: the objectives its MLflow run finished with (FINISHED, every objective's
    metric logged), or None."""
    def values(trial: FrozenTrial) -> list[float] | None:
        run_id = trial.user_attrs.get(USER_ATTR_RUN_ID)
        if not run_id:
            return None
        try:
            run = mlflow.tracking.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return None
        found = [run.data.metrics.get(metric) for metric in spec.metrics]
        if run.info.status != "FINISHED" or any(v is None or not math.isfinite(v) for v in found):
            return None
        return found

    return values


def stale_trial_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback for a trial whose heartbeat went stale (its process died anywhere)."""
    mark_dead(study, trial, "died mid-trial (its Optuna heartbeat went stale)", Failure.STALE)


def dead_here_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    mark_dead(study, trial, "died mid-trial (its pid is gone on this host; heartbeat not awaited)", Failure.KILLED)
