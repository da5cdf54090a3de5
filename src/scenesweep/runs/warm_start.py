"""Warm start from the tracker: a new study begins from earlier trial runs found in MLflow.

``warm_start: {experiment: NAME | study: NAME, where: FILTER, as: results|enqueue, max: N}``
finds the FINISHED trial runs of that experiment (or of that study, in any experiment) that match
``where`` (MLflow's filter language, as ``promote --where``), best first on the study's first
objective, at most ``max`` of them, before any trial runs:

* ``as: results`` adds them to the new study as finished trials with their logged values
  (Optuna's ``create_trial`` + ``add_trial``): the sampler learns from them as from its own. Only
  runs measured under this study's setting are comparable: the parameters that change a result
  (the parameter table's: data, weights, image size, ...; the dataset by content) must equal
  this study's, else the study is refused naming the keys that differ. They do not spend the
  study's ``n_trials`` (they ran elsewhere).
* ``as: enqueue`` runs their parameter sets first, here (new data, new seed: anything may differ).

Each such trial carries the earlier run's id as user attribute ``warm_start.source_run_id`` (and
its run, for ``enqueue``, the tag of that name); the parent run says how many came
(``warm_start.count``). It happens once per study, under the study lock.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import mlflow
import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from ..core.config import PARAMETER_BY_NAME
from ..core.errors import ConfigError
from ..search.trials import USER_ATTR_WARM_MODE, USER_ATTR_WARM_SOURCE
from ..specs.studies import Dimension, StudySpec

STUDY_ATTR_WARM = "warm_start_added"  # set once the earlier trials are in the study


@dataclasses.dataclass(frozen=True)
class EarlierTrial:
    """One earlier trial run to start from: its run id, its parameters (this study's space
    keys, converted), its objective values and every metric it logged."""

    run_id: str
    params: dict[str, Any]
    values: list[float]
    metrics: dict[str, float]
    label: str  # 'svm_a #3' for messages


def distribution(dim: Dimension) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution ``search.sampling.suggest`` asks for this dimension."""
    if dim.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(dim.choices))
    if dim.type == "int":
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)


def _where(spec: StudySpec) -> str:
    return f"warm_start ({spec.warm_start.experiment and 'experiment ' + repr(spec.warm_start.experiment) or 'study ' + repr(spec.warm_start.study)})"


def _search(spec: StudySpec) -> list[Run]:
    """The source's FINISHED trial runs matching ``where``, best first on the first objective."""
    warm = spec.warm_start
    client = MlflowClient()
    if warm.experiment is not None:
        experiment = client.get_experiment_by_name(warm.experiment)
        if experiment is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise ConfigError(f"{spec.path}: warm_start.experiment={warm.experiment!r}: no such MLflow experiment "
                              f"in {mlflow.get_tracking_uri()} (experiments: {known})")
        experiments, base = [experiment.experiment_id], "attributes.status = 'FINISHED'"
    else:
        if "'" in warm.study:
            raise ConfigError(f"{spec.path}: warm_start.study={warm.study!r}: a study name without quotes")
        experiments = [e.experiment_id for e in client.search_experiments()]
        base = f"attributes.status = 'FINISHED' AND tags.study = '{warm.study}'"
    goal = spec.goals[0]
    order = f"metrics.`{goal.metric}` {'DESC' if goal.direction == 'maximize' else 'ASC'}"
    try:
        runs = client.search_runs(experiments, filter_string=f"{base} AND {warm.where}" if warm.where else base,
                                  order_by=[order], max_results=5000)
    except mlflow.exceptions.MlflowException as error:
        raise ConfigError(f"{spec.path}: warm_start.where={warm.where!r}: MLflow refuses it "
                          f"({str(error.message).splitlines()[0]})") from None
    return [run for run in runs if "trial_number" in run.data.tags]  # trials, not parents or single runs


def _params(spec: StudySpec, run: Run) -> dict[str, Any] | None:
    """The run's values of this study's space keys, converted and inside the space; None (with
    why, printed) when the run lacks one or lies outside."""
    params = {}
    for name, dim in spec.space.items():
        text = _logged(run.data.params, name)
        if text is None:
            print(f"warm start: run {run.info.run_id} has no param {name!r}: left out", file=sys.stderr)
            return None
        value = PARAMETER_BY_NAME[name].convert(text)
        if dim.type == "categorical":
            match = [choice for choice in dim.choices if str(PARAMETER_BY_NAME[name].convert(choice)) == str(value)]
            value = match[0] if match else None
        if value is None or not distribution(dim)._contains(distribution(dim).to_internal_repr(value)):
            print(f"warm start: run {run.info.run_id}'s {name}={text} lies outside this study's space: left out",
                  file=sys.stderr)
            return None
        params[name] = value
    return params


def _logged(params: dict[str, str], name: str) -> str | None:
    """A run's value of parameter ``name`` as its run resolved it: under ``mlflow run`` the
    MLproject's '' ("the file's") is logged as given and the value under ``resolved.<name>``."""
    value = params.get(name)
    return params.get(f"resolved.{name}", value) if value in (None, "") else value


def _setting_differs(run: Run, setting: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """The keys of this study's setting on which ``run`` was measured otherwise."""
    logged = run.data.params
    differ = {}
    for key, value in setting.items():
        if key.startswith("tuning."):
            continue
        if key == "dataset":
            theirs = logged.get("dataset_fingerprint")
        else:
            theirs = _logged(logged, key)
        if key == "data" and "dataset" in setting:
            continue  # compared by content
        if theirs is None or theirs != value:
            if theirs is not None and key in PARAMETER_BY_NAME:
                try:  # '32' and '32.0', 'True' and 'true': the same setting
                    convert = PARAMETER_BY_NAME[key].convert
                    if convert(theirs) == convert(value):
                        continue
                except ConfigError:
                    pass
            differ[key] = (theirs, value)
    return differ


def find_earlier_trials(spec: StudySpec, setting: dict[str, str]) -> list[EarlierTrial]:
    """The earlier trials a new study of ``spec`` starts from (before any trial runs).

    Args:
        spec: the study file, with its ``warm_start``.
        setting: the study's setting (``runs.sweep.study_setting``: result parameters and dataset).

    Raises:
        ConfigError: the source does not exist, has no finished trial run matching ``where``,
            ``where`` does not parse, or (``as: results``) a run was measured under another setting.
    """
    warm = spec.warm_start
    runs = _search(spec)
    if not runs:
        raise ConfigError(f"{spec.path}: {_where(spec)}: no FINISHED trial run"
                          + (f" matches where: {warm.where}" if warm.where else "") + " to start from")
    found: list[EarlierTrial] = []
    for run in runs:
        if len(found) >= warm.max:
            break
        label = f"{run.data.tags.get('study', '?')} #{run.data.tags.get('trial_number', '?')}"
        if warm.mode == "results":
            differ = _setting_differs(run, setting)
            if differ:
                shown = "; ".join(f"{k}: {theirs} -> {ours}" for k, (theirs, ours) in sorted(differ.items()))
                raise ConfigError(f"{spec.path}: warm_start: run {run.info.run_id} ({label}) was measured under "
                                  f"other settings ({shown}); its results are not comparable: use as: enqueue "
                                  "to run its parameters here, or narrow warm_start.where")
            missing = [m for m in spec.metrics if m not in run.data.metrics]
            if missing:
                print(f"warm start: run {run.info.run_id} ({label}) has no {', '.join(missing)}: left out",
                      file=sys.stderr)
                continue
        params = _params(spec, run)
        if params is None:
            continue
        found.append(EarlierTrial(run.info.run_id, params, [run.data.metrics.get(m, float("nan")) for m in spec.metrics],
                                  dict(run.data.metrics), label))
    if not found:
        raise ConfigError(f"{spec.path}: {_where(spec)}: none of its {len(runs)} finished trial runs fits this "
                          "study's space and objectives")
    return found


def add_earlier_trials(study: optuna.Study, spec: StudySpec, earlier: list[EarlierTrial]) -> int:
    """Put the earlier trials into the study, once (call under the study lock).

    Returns:
        How many came (0 when a worker did it before).
    """
    if not earlier or STUDY_ATTR_WARM in study.user_attrs:
        return 0
    distributions = {name: distribution(dim) for name, dim in spec.space.items()}
    for trial in earlier:
        attrs = {USER_ATTR_WARM_SOURCE: trial.run_id, USER_ATTR_WARM_MODE: spec.warm_start.mode}
        if spec.warm_start.mode == "enqueue":
            study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=True)
            continue
        frozen = optuna.trial.create_trial(params=trial.params, distributions=distributions, values=trial.values,
                                           user_attrs=attrs)
        for constraint in spec.constraints:
            if constraint.metric in trial.metrics:
                frozen.set_constraint(str(constraint), constraint.value(trial.metrics[constraint.metric]))
        study.add_trial(frozen)
    study.set_user_attr(STUDY_ATTR_WARM, len(earlier))
    return len(earlier)
