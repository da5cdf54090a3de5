"""``scenesweep register --study S --trial N``: register another trial of a finished study.

A multi-objective study registers one trial of its Pareto front (its ``select`` rule); the heads
of the front's other trials are kept (``search.kept_heads``) so that any of them can be
registered later, by choice: one version, whose model record carries that trial's own
configuration and metrics, its test accuracy computed once for it. The trial's configuration is
rebuilt from the study file logged on the study's parent run (``study/<file>``) and the setting
the parent logged (the command line's overrides included).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..core.config import run_parameters
from ..core.errors import ConfigError
from ..core.store_urls import redact
from ..models.registry import register_result
from ..search.optuna_storage import resolve_storage
from ..search.trials import USER_ATTR_RUN_ID, is_feasible
from ..specs.studies import StudySpec, load_study
from ..tracking import mlflow_store
from .parent import STUDY_ATTR_PARENT
from .summary import evaluate_trial, registry_objective


def _study(study_name: str, storage_url: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        names = optuna.get_all_study_names(storage_url)
        raise ConfigError(f"--study {study_name!r}: no such study in {redact(storage_url)} (studies: "
                          f"{', '.join(names) or 'none'})") from None


def study_spec(study: optuna.Study) -> tuple[StudySpec, str]:
    """The study file as its parent run logged it, with the setting the parent resolved
    (overrides included). Returns (spec, parent run id)."""
    parent_id = study.user_attrs.get(STUDY_ATTR_PARENT)
    if not parent_id:
        raise ConfigError(f"study {study.study_name!r} has no MLflow parent run: run its sweep first")
    client = MlflowClient()
    parent = client.get_run(parent_id)
    files = [f.path for f in client.list_artifacts(parent_id, "study") if not f.is_dir]
    if not files:
        raise ConfigError(f"study {study.study_name!r}: its parent run {parent_id} holds no study file (study/)")
    folder = tempfile.mkdtemp(prefix="scenesweep-study-")
    path = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path=files[0], dst_path=folder))
    params = parent.data.params
    head = params.get("tunes", "svm")
    raw = load_study(path)
    overrides = {k: params.get(f"resolved.{k}", params[k]) for k in run_parameters(head)
                 if k in params and k not in raw.space}
    return load_study(path, overrides), parent_id


def register_trial(study_name: str, number: int, storage: str | None = None, model_name: str | None = None,
                   progress: bool = False) -> tuple[str, str, dict]:
    """Register trial ``number`` of ``study_name`` as one new version.

    Returns:
        (model name, version, the trial's metrics with its one test evaluation).

    Raises:
        ConfigError: no such study or trial, a trial that did not complete or broke a
            constraint (never registered), or a study without a model name.
    """
    mlflow_store.setup_tracking()
    storage_url = resolve_storage(storage)
    study = _study(study_name, storage_url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"--trial {number}: study {study_name!r} has trials #0..#{max(trials, default=-1)}")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise ConfigError(f"--trial {number}: it ended {trial.state.name} (only a complete trial is registered)")
    if not is_feasible(trial):
        broken = ", ".join(k for k, v in trial.constraints.items() if v > 0)
        raise ConfigError(f"--trial {number}: it breaks the study's constraints ({broken}); an infeasible trial is "
                          "never registered")
    spec, parent_id = study_spec(study)
    name = model_name or spec.register
    if not name:
        raise ConfigError(f"study {study_name!r} registers no model (register: \"\"): give --name NAME")
    result = evaluate_trial(spec, trial, f"trial #{number}", progress)
    run_id = trial.user_attrs.get(USER_ATTR_RUN_ID, "")
    version = register_result(parent_id, result, name, extra_tags={
        "study": study.study_name, "trial_number": str(number)},
        source_run_id=run_id or None, objective=registry_objective(spec))
    return name, version, result.metrics
