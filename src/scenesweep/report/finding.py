"""Finding an experiment's runs in the tracking store: its latest finished real and demo runs.

Runs are tagged ``scenesweep.experiment`` by ``scenesweep run``; a study's parent run launched
directly with ``scenesweep sweep`` (or ``mlflow run -e sweep_*``) counts too, by its study file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from ..core.config import PARAMETER_BY_NAME
from ..specs.experiments import TAG_EXPERIMENT, TAG_SETTING, Experiment, is_demo_setting


@dataclasses.dataclass
class Found:
    """The runs of one experiment: the one shown, and what is missing.

    Attributes:
        run: the run shown (latest finished real run, else latest finished demo run), or None.
        setting: "real" or "demo" for ``run``.
        other: the latest finished run of the other setting, when there is one.
    """

    experiment: Experiment
    run: Any = None
    setting: str | None = None
    other: Any = None


def all_experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    if not experiment_ids:
        return []
    return client.search_runs(experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                              max_results=1000)


def resolved_params(run) -> dict[str, str]:
    """A run's parameters as they were resolved, not as they were typed.

    Under ``mlflow run`` a run's own params are the MLproject's values as given (for a sweep,
    ``''``: "the study file's value"); what was used differs and is logged as
    ``resolved.<name>``. A sweep's parent logs its study file's fixed settings (with the
    command line's) as ``fixed.<name>``. Both are taken as ``<name>`` (``resolved.`` last, it is
    what ran); a ``''`` left over (a parent logged before it logged its resolved setting) is the
    study file's value where it fixes one, else the parameter's default.
    """
    params = dict(run.data.params)
    for prefix in ("fixed.", "resolved."):
        for key, value in run.data.params.items():
            if key.startswith(prefix):
                params[key[len(prefix):]] = value
    for name, value in list(params.items()):
        parameter = PARAMETER_BY_NAME.get(name)
        if value in ("", "''") and parameter is not None and parameter.default != "":
            default = parameter.default
            params[name] = str(default).lower() if isinstance(default, bool) else str(default)
    return params


def run_setting(run, experiment: Experiment) -> str:
    """'demo' or 'real': the tag set by ``scenesweep run``, else judged from the run's resolved params."""
    tagged = run.data.tags.get(TAG_SETTING)
    if tagged in ("demo", "real"):
        return tagged
    return "demo" if is_demo_setting(resolved_params(run), experiment.uses_data) else "real"


def _same_study_file(tag: str, experiment: Experiment) -> bool:
    if not tag:
        return False
    return Path(tag).as_posix().endswith(Path(experiment.what).as_posix())


def find_runs(client: MlflowClient, experiment: Experiment, experiment_ids: list[str]) -> Found:
    """The latest finished runs of ``experiment``, real and demo."""
    runs = _search(client, experiment_ids,
                   f"tags.`{TAG_EXPERIMENT}` = '{experiment.name}' and attributes.status = 'FINISHED'")
    if experiment.kind == "study":
        # Parent runs of the same study file launched with `scenesweep sweep` / `mlflow run -e sweep_*`.
        parents = _search(client, experiment_ids, "tags.sweep = 'parent' and attributes.status = 'FINISHED'")
        runs += [r for r in parents if TAG_EXPERIMENT not in r.data.tags
                 and _same_study_file(r.data.tags.get("study_file", ""), experiment)]
        runs.sort(key=lambda r: r.info.start_time, reverse=True)
    latest: dict[str, Any] = {}
    for run in runs:
        latest.setdefault(run_setting(run, experiment), run)
    found = Found(experiment)
    for setting in ("real", "demo"):
        if setting in latest:
            found.run, found.setting = latest[setting], setting
            found.other = latest.get("demo") if setting == "real" else None
            break
    return found
