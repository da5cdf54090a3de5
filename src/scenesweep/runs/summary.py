"""The summary of a finished study, written once by the worker that sees it finished.

On the study's parent run: the trials table and Optuna's plots, the best trial's params and
value, the best child tagged, the one test evaluation (the best trial's own kept head; refitted
from cached features only when none was kept), its curves, confusion matrix and per-class
results, and the registered model; the
study's optuna-dashboard note links the parent run and the registered version. The parent run
ends here.
"""
from __future__ import annotations

import contextlib
import sys
import time

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note

from ..compute.training import RunResult, evaluate_test_split, fit_head, fit_head_folds, prepare, score_head
from ..core.run_states import Failure, Status
from ..models.registry import challenger_text, register_result
from ..search.kept_heads import kept_head
from ..search.trials import (USER_ATTR_RUN_ID, USER_ATTR_WARM_SOURCE, TrialBudget, best_per_group, count_metrics,
                             is_dead_here, is_own_setting, pareto_optimal, state_counts, this_worker)
from ..specs.studies import StudySpec
from ..tracking import lifecycle, plots, provenance, sink
from .study_artifacts import log_optuna_plots, log_pareto, log_trials_table, trial_run_metrics
from .study_outcome import BestTrial, Summary

STUDY_ATTR_SUMMARY = "summary"  # {"finished", "parent", "best_trial", "registered_version"}
STUDY_ATTR_SUMMARY_CLAIM = "summary_claim"
CLAIM_EXPIRY_S = 3600  # a summary claimed by a worker that never wrote it is taken over after this
NO_MATCH = "no Pareto-optimal trial"  # how a multi-objective study's select rule says it picked none


def claim_summary(study: optuna.Study, parent_id: str, lock) -> bool:
    """Whether this worker summarises the study now: nothing runs, and no one has summarised
    (or is summarising) the trials finished so far. Decided under the study lock."""
    with lock:
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            return False  # a live worker finishes the study and summarises it
        finished = TrialBudget.finished(trials)
        done = study.user_attrs.get(STUDY_ATTR_SUMMARY) or {}
        if done.get("finished") == finished and done.get("parent") == parent_id:
            return False
        claim = study.user_attrs.get(STUDY_ATTR_SUMMARY_CLAIM) or {}
        if (claim.get("finished") == finished and claim.get("parent") == parent_id
                and time.time() - claim.get("time", 0) < CLAIM_EXPIRY_S and not is_dead_here(claim.get("worker", {}))):
            return False
        study.set_user_attr(STUDY_ATTR_SUMMARY_CLAIM, {"finished": finished, "parent": parent_id,
                                                      "time": time.time(), "worker": this_worker()})
        return True


def _first_error(client: MlflowClient, trials: list[FrozenTrial]) -> str:
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(USER_ATTR_RUN_ID):
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                error = client.get_run(trial.user_attrs[USER_ATTR_RUN_ID]).data.tags.get("error", "")
                if error:
                    return error
    return ""


def _tag_children(client: MlflowClient, parent_id: str, experiment_id: str, trials: list[FrozenTrial],
                  best_run_id: str) -> None:
    """``best_trial=true`` on the best trial's run, ``false`` on the other complete ones."""
    children = {r.info.run_id for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'", max_results=10000)}
    for trial in trials:
        run_id = trial.user_attrs.get(USER_ATTR_RUN_ID)
        if trial.state == TrialState.COMPLETE and run_id in children:
            client.set_tag(run_id, "best_trial", "true" if run_id == best_run_id else "false")
            name = client.get_run(run_id).info.run_name or ""
            if run_id == best_run_id and not name.endswith("· best"):
                client.set_tag(run_id, "mlflow.runName", f"{name} · best")  # the best trial, named as such
            elif run_id != best_run_id and name.endswith(" · best"):
                client.set_tag(run_id, "mlflow.runName", name[:-len(" · best")])  # a later resume found better


def evaluate_best(spec: StudySpec, best: FrozenTrial, progress: bool) -> RunResult:
    """The one test evaluation of ``best``: its kept head scored (``result.refitted`` False), else
    its configuration (with its tuning settings, for a tuning trial) refitted, saying why."""
    what = "selected" if spec.multi_objective else "best"
    return evaluate_trial(spec, best, f"the {what} trial #{best.number}", progress)


def evaluate_trial(spec: StudySpec, trial: FrozenTrial, what: str, progress: bool) -> RunResult:
    """Test metrics, once, of a trial's head: the head it fitted (kept when it was the best so far),
    else the same configuration refitted (features from the cache), with a line saying why."""
    began = time.monotonic()
    config = spec.trial_config(trial.params, tuning=not is_own_setting(trial))
    prepared = prepare(config, progress=progress)
    head, why = kept_head(trial)
    if head is not None:
        result = score_head(prepared, head)
        if spec.folds:
            # Its head was fitted on every training image: its validation figures are the folds'.
            result.metrics.update({k: v for k, v in trial_run_metrics(MlflowClient(), trial).items()
                                   if k in ("val/acc", "val/loss", "val/acc_std")})
    else:
        print(f"refitting {what} to score the test split once: {why}", file=sys.stderr)
        result = (fit_head_folds(prepared, config, spec.folds) if spec.folds
                  else fit_head(prepared, config, progress=progress))
        result.refitted = True
    test_metrics, result.confusion = evaluate_test_split(prepared, result.head)
    result.metrics.update(test_metrics)
    print(f"test evaluation of {what} ({'refitted' if result.refitted else 'its own head'}): "
          f"test/acc {test_metrics['test/acc']:.4f} on {len(prepared.split.test)} images "
          f"in {time.monotonic() - began:.1f} s", file=sys.stderr)
    return result


def _log_best(study: optuna.Study, spec: StudySpec, parent_id: str, best: FrozenTrial, result: RunResult,
              new_best: bool = True) -> None:
    """The best trial's test evaluation on the parent; ``new_best``: not summarised before (a
    resume whose best trial did not change does not append its per-class rows again)."""
    # A refit's own validation accuracy says whether it reproduced the trial (a kept head is the trial's).
    refit = {"best/val/acc_refit": result.metrics["val/acc"]} if result.refitted else {}
    # best/<metric> at the last trial's step: the end of the live best-so-far series of that name
    # (runs.sweep.log_progress), added only where that series does not already end on it.
    last_step = max(t.number for t in study.get_trials(deepcopy=False))
    logged = MlflowClient().get_run(parent_id).data.metrics
    sink.log_batch(parent_id, metrics={f"best/{m}": v for m, v in zip(spec.metrics, best.values)
                                       if logged.get(f"best/{m}") != v}, step=last_step)
    sink.log_batch(parent_id, metrics={**{k: v for k, v in result.metrics.items() if k.startswith("test/")},
                                       **refit},
                   params={f"best.{k}": v for k, v in best.params.items()},
                   tags={"best_head": "refitted" if result.refitted else "kept (the trial's own head)"})
    classes = result.prepared.dataset.classes
    plots.log_figure(plots.confusion_figure(result.confusion, classes,
                                            f"{spec.study}: best trial #{best.number}, test"), "plots/confusion_matrix.png",
                     parent_id)
    result.metrics.update(sink.log_per_class(parent_id, result.confusion, classes,
                                             extra_columns={"trial": best.number}, table=new_best))
    if not MlflowClient().get_run(parent_id).inputs.dataset_inputs:
        # A study that searches a data parameter (seed, train_per_class): the best trial's splits.
        sink.log_datasets(parent_id, result.prepared.dataset, result.prepared.split)
    if result.history:
        plots.log_figure(plots.curves_figure({"": result.history}, f"best trial #{best.number}"), "plots/curves.png",
                         parent_id)
    MlflowClient().log_dict(parent_id, result.prepared.config.as_dict(), "best_config.yaml")
    # The UI shows the first lines of a description: the result first, then how it was obtained.
    MlflowClient().set_tag(parent_id, "mlflow.note.content", (
        f"Best trial #{best.number}: "
        + ", ".join(f"{m} = {v:.4g}" for m, v in zip(spec.metrics, best.values)) + " with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
        + f"; test/acc = {result.metrics['test/acc']:.4f} (computed once, for this trial)\n\n"
        f"{spec.description_as_run}\n\nStudy `{study.study_name}` from `{spec.path}`\n\n"
        f"Command: `{provenance.command_line()}`"))


def study_note(study: optuna.Study, parent_id: str, experiment_id: str, summary: Summary,
               model_name: str | None, version: str | None = None) -> str:
    """The study's optuna-dashboard note (Markdown): its parent run and registered ``version``, linked."""
    uri = mlflow.get_tracking_uri()
    lines = [f"## Study `{study.study_name}`", "",
             f"MLflow parent run: {provenance.ui_link(parent_id, provenance.run_ui_path(experiment_id, parent_id), uri)}"
             f" (experiment id `{experiment_id}`, run id `{parent_id}`)", ""]
    best = summary.best
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        lines += [f"Best trial #{best.number}: {best.value:.4f} ({params}); test/acc = {best.test_acc:.4f}", ""]
    elif summary.error:
        lines += [summary.error, ""]
    if model_name and version:
        path = provenance.model_version_ui_path(model_name, version)
        lines += [f"Registered: {provenance.ui_link(f'{model_name} version {version}', path, uri)} "
                  f"(`models:/{model_name}/{version}`)", ""]
    hint = provenance.ui_hint(uri)
    return "\n".join(lines + [hint] if hint else lines).rstrip() + "\n"


def _save_study_note(study: optuna.Study, parent_id: str, experiment_id: str, summary: Summary,
                     model_name: str | None, version: str | None = None) -> None:
    with contextlib.suppress(Exception):  # a note is a convenience, never why a summary fails
        save_note(study, study_note(study, parent_id, experiment_id, summary, model_name, version))


def _summarise_failure(study: optuna.Study, parent_id: str, trials: list[FrozenTrial], states: dict,
                       error: str | None = None) -> Summary:
    first = _first_error(MlflowClient(), trials)
    error = error or (f"no trial of study {study.study_name!r} completed ({states['FAIL']} failed, "
                      f"{states['PRUNED']} pruned)" + (f"; first error: {first}" if first else ""))
    study.set_user_attr(STUDY_ATTR_SUMMARY, {"finished": TrialBudget.finished(trials), "parent": parent_id,
                                             "best_trial": None})
    lifecycle.end_run(parent_id, Status.FAILED, error, failure=Failure.ERROR, best_trial="none: no trial completed")
    return Summary(error=error)


def summarise(study: optuna.Study, spec: StudySpec, parent_id: str, register: bool = True,
              progress: bool = True) -> Summary:
    """Best trial, trials table, plots, and the one test evaluation, logged on the parent.

    The parent run is ended here: FINISHED, or FAILED
    with an ``error`` tag when no trial completed. A version is registered when the best trial
    has none yet (a resume whose best trial did not change registers nothing new).
    """
    trials = study.get_trials(deepcopy=False)
    previous = study.user_attrs.get(STUDY_ATTR_SUMMARY) or {}
    # Every call names the parent (no fluent active run): the summary may run in a worker whose
    # own trials' runs were the last it touched.
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    with lifecycle.ending(parent_id):
        log_trials_table(study, parent_id)
        log_optuna_plots(study, spec, parent_id)
        states = state_counts(trials)
        # The names and steps of the parent's live chart (runs.sweep.log_progress).
        sink.log_batch(parent_id, metrics=count_metrics(trials), step=max(t.number for t in trials))
        if not states["COMPLETE"]:
            failure = _summarise_failure(study, parent_id, trials, states)
            _save_study_note(study, parent_id, experiment_id, failure, None)
            return failure
        best, why_none = choose_best(study, spec, parent_id, experiment_id, trials)
        if best is None and why_none.startswith(NO_MATCH):
            # The study ran well; its rule picks nothing to register: said, not failed.
            print(f"note: {why_none}", file=sys.stderr)
            sink.log_batch(parent_id, tags={"best_trial": "none: select.where matched no Pareto-optimal trial",
                                            "mlflow.note.content": f"{why_none}\n\n{spec.description_as_run}"})
            study.set_user_attr(STUDY_ATTR_SUMMARY, {"finished": TrialBudget.finished(trials), "parent": parent_id,
                                                     "best_trial": None})
            return Summary(note=why_none)
        if best is None:
            failure = _summarise_failure(study, parent_id, trials, states, why_none)
            _save_study_note(study, parent_id, experiment_id, failure, None)
            return failure
        best_run_id = best.user_attrs.get(USER_ATTR_RUN_ID) or best.user_attrs.get(USER_ATTR_WARM_SOURCE, "")
        _tag_children(MlflowClient(), parent_id, experiment_id, trials, best_run_id)
        sink.log_batch(parent_id, tags={"best_trial": str(best.number), "best_run_id": best_run_id,
                                        "mlflow.runName": finished_name(study.study_name, spec.metric, best.values[0])})
        result = evaluate_best(spec, best, progress)
        summarised_before = (previous.get("best_trial"), previous.get("parent")) == (best.number, parent_id)
        _log_best(study, spec, parent_id, best, result, new_best=not summarised_before)
        chosen = BestTrial(best.number, best.params, dict(zip(spec.metrics, best.values)), best_run_id, result)
        version = previous.get("registered_version") if previous.get("best_trial") == best.number else None
        if register and spec.register and version is None:
            version = chosen.model_version = register_result(parent_id, result, spec.register, extra_tags={
                "study": study.study_name, "trial_number": str(best.number)},
                source_run_id=best_run_id or None, objective=registry_objective(spec))
            chosen.alias = challenger_text(spec.register, version)
        study.set_user_attr(STUDY_ATTR_SUMMARY, {"finished": TrialBudget.finished(trials), "parent": parent_id,
                                                 "best_trial": best.number, "registered_version": version})
        summary = Summary(best=chosen)
        _save_study_note(study, parent_id, experiment_id, summary, spec.register if register else None, version)
    return summary


def finished_name(study_name: str, metric: str, value: float) -> str:
    """A finished parent's name, its result readable in the runs table: 'svm study · best val/acc 0.9500'."""
    return f"{study_name} study · best {metric} {value:.4f}"


def registry_objective(spec: StudySpec) -> tuple[str, str]:
    """What ``@challenger`` is compared on: the selection's (or first objective's) metric when it
    is a validation metric a version records, else val/acc."""
    metric, direction = (spec.select.metric, spec.select.direction) if spec.select else (spec.metric, spec.direction)
    return (metric, direction) if metric.startswith("val/") else ("val/acc", "maximize")


def choose_best(study: optuna.Study, spec: StudySpec, parent_id: str, experiment_id: str,
                trials: list[FrozenTrial]) -> tuple[FrozenTrial | None, str]:
    """The trial the study registers, or None with why.

    One objective: the best complete feasible trial (the first of equal values: Optuna leaves
    ties to the database's order; it is the trial whose head was kept, search.kept_heads, and
    the one each worker would name). Several: the Pareto front (logged: ``log_pareto``), then the
    study's ``select`` rule: the best on its metric among the front's trials whose runs match its
    ``where``; by default the front's best on the first objective.
    """
    if not spec.multi_objective:
        found = best_per_group(trials, None, spec.direction)
        if found:
            return found["best"], ""
        return None, (f"no trial of study {study.study_name!r} meets its constraints "
                      f"({'; '.join(map(str, spec.constraints))}): nothing is best, nothing registered")
    front = pareto_optimal(trials, spec.directions)
    client = MlflowClient()
    metrics = {t.number: trial_run_metrics(client, t) for t in front}
    log_pareto(study, spec, parent_id, experiment_id, trials, front, metrics)
    if not front:
        return None, f"no trial of study {study.study_name!r} is feasible: the Pareto front is empty"
    select = spec.select
    metric, direction = (select.metric, select.direction) if select else (spec.metric, spec.direction)
    candidates = front
    if select is not None and select.where:
        matching = {r.info.run_id for r in client.search_runs(
            [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' AND {select.where}",
            max_results=10000)}
        candidates = [t for t in front if t.user_attrs.get(USER_ATTR_RUN_ID) in matching]
        if not candidates:
            return None, (f"{NO_MATCH} of study {study.study_name!r} matches select.where: "
                          f"{select.where}; nothing registered (the front is in pareto.csv)")
    sign = 1.0 if direction == "maximize" else -1.0
    scored = [t for t in candidates if metrics[t.number].get(metric) is not None]
    if not scored:
        return None, f"no Pareto-optimal trial logged {metric}"
    return max(scored, key=lambda t: (sign * metrics[t.number][metric], -t.number)), ""
