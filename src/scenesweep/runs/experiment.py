"""One experiment of the reference study, run from its plan (``specs.plans.Plan``).

A study goes through ``runs.sweep``, a single run through ``runs.single``, the parameter table,
ImageNet classes and feature maps through ``runs.experiment_kinds``; every MLflow run an experiment makes is
tagged ``scenesweep.*`` so that the report finds it. A study with a ``test_per`` key gets the
test accuracy, computed once, of the best trial of each group (pooling type, width, layer).
"""
from __future__ import annotations

from typing import Any

import optuna
from mlflow.tracking import MlflowClient


from ..core.config import REGISTERED_MODEL
from ..core.errors import RunFailedError
from ..search.optuna_storage import resolve_storage
from ..search.trials import USER_ATTR_RUN_ID, best_per_group
from ..specs.experiments import TAG_TEST_PER
from ..specs.plans import Plan
from ..specs.studies import StudySpec
from ..tracking import mlflow_store, sink
from . import experiment_kinds
from .experiment_kinds import Outcome
from .single import track_single_run
from .study_outcome import summary_lines
from .summary import evaluate_trial
from .sweep import run_study


def run(plan_: Plan, progress: bool = True, register: bool = False) -> Outcome:
    """Run a resolved experiment; every MLflow run it makes is tagged for the report."""
    mlflow_store.setup_tracking()
    runner = {"study": _run_study, "run": _run_single, "describe": experiment_kinds.run_describe,
              "imagenet": experiment_kinds.run_imagenet, "featuremaps": experiment_kinds.run_featuremaps}[plan_.experiment.kind]
    return runner(plan_, progress=progress, register=register)


def _run_single(plan_: Plan, progress: bool, register: bool) -> Outcome:
    entry_point = plan_.experiment.what
    run_id, result = track_single_run(entry_point, plan_.values, progress=progress,
                                      register=REGISTERED_MODEL if register else "")
    sink.log_batch(run_id, tags=plan_.tags())
    if result is None:
        return Outcome(run_id, [f"run {run_id}: features extracted"])
    m = result.metrics
    line = f"run {run_id}: train/acc={m['train/acc']:.4f} val/acc={m['val/acc']:.4f} test/acc={m['test/acc']:.4f}"
    if result.history:
        best = max(result.history, key=lambda h: h["val/acc"])
        line += f"; best val/acc {best['val/acc']:.4f} at epoch {best['epoch']}"
    return Outcome(run_id, [line])


def _run_study(plan_: Plan, progress: bool, register: bool) -> Outcome:
    spec = plan_.spec
    outcome = run_study(spec, study_name=plan_.study_name, n_trials=plan_.options.get("n_trials"),
                        timeout=plan_.options.get("timeout"), progress=progress, register=register,
                        keep_best_per=plan_.options.get("test_per"))
    parent_id = outcome.parent_run_id
    tags = plan_.tags()
    test_per = plan_.options.get("test_per")
    if test_per:
        tags[TAG_TEST_PER] = test_per
    sink.log_batch(parent_id, tags=tags)
    lines = summary_lines(outcome, spec)
    if outcome.error:
        raise RunFailedError(outcome.error)
    if test_per and outcome.summarised:
        # The study's best trial was just scored on test (on the parent): not refitted again.
        known = {}
        if outcome.best is not None and outcome.best.run_id:
            known[outcome.best.run_id] = {k: v for k, v in outcome.best.result.metrics.items()
                                          if k.startswith("test/")}
        for row in evaluate_best_per_group(spec, plan_.study_name, test_per, progress=progress, known=known):
            lines.append(f"best of {test_per}={row['group']}: trial #{row['trial']} {spec.metric}={row['value']:.4f} "
                         f"test/acc={row['test/acc']:.4f}")
    return Outcome(parent_id, lines)


def _test_metrics(spec: StudySpec, trial, run_id: str, why: str, known: dict, progress: bool) -> dict[str, float]:
    """The trial's test metrics: from its run, from ``known``, else refitted and scored once."""
    logged = MlflowClient().get_run(run_id).data.metrics if run_id else {}
    if "test/acc" in logged:
        return {"test/acc": logged["test/acc"], "test/loss": logged.get("test/loss", float("nan"))}
    if run_id in known:
        sink.log_batch(run_id, metrics=known[run_id], tags={"test_evaluated": f"{why} (the study's best trial)"})
        return known[run_id]
    result = evaluate_trial(spec, trial, f"trial #{trial.number}, the {why}", progress)
    test = {k: v for k, v in result.metrics.items() if k.startswith("test/")}
    if run_id:
        refit = {"val/acc_refit": result.metrics["val/acc"]} if result.refitted else {}
        sink.log_batch(run_id, metrics={**test, **refit}, step=len(result.history),
                       tags={"test_evaluated": why, "test_head": "refitted" if result.refitted else "kept"})
    return test


def evaluate_best_per_group(spec: StudySpec, study_name: str, key: str, storage: str | None = None,
                            progress: bool = True,
                            known: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Test accuracy, once, of the best trial (by the study's objective) of each value of ``key``.

    The study compares settings (pooling types, fc widths, feature layers) by their test
    accuracy; selection still reads only the validation metric: within each group the trial is
    chosen on it, then its kept head (refitted from cached features when none was kept) is
    scored on test, and the
    test metrics are logged on that trial's run with a ``test_evaluated`` tag saying why. A
    trial already evaluated (on its run, or in ``known``: run id -> test metrics) is not
    scored again.

    Returns:
        One dict per group: group, trial, value, run_id, test/acc, test/loss.
    """
    study = optuna.load_study(study_name=study_name, storage=resolve_storage(storage))
    best = best_per_group(study.get_trials(deepcopy=False), key, spec.direction)
    rows = []
    for group, trial in sorted(best.items(), key=lambda item: item[1].number):
        run_id = trial.user_attrs.get(USER_ATTR_RUN_ID, "")
        test = _test_metrics(spec, trial, run_id, f"best trial of {key}={group} by {spec.metric}", known or {},
                             progress)
        rows.append({"group": group, "trial": trial.number, "value": trial.value, "run_id": run_id, **test})
    return rows
