"""What a study's summary logs on its parent besides the best trial: the trials table, Optuna's
plots, and for several objectives the Pareto front (``pareto.csv``, its plot, ``pareto/*`` series,
front runs tagged).
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as oplt

from ..search.trials import USER_ATTR_RUN_ID, USER_ATTR_WARM_SOURCE
from ..specs.studies import StudySpec
from ..tracking import plots, sink


def trial_run_metrics(client: MlflowClient, trial: FrozenTrial) -> dict[str, float]:
    """The trial's logged metrics (an earlier run's for a warm start's result), its objectives on top."""
    run_id = trial.user_attrs.get(USER_ATTR_RUN_ID) or trial.user_attrs.get(USER_ATTR_WARM_SOURCE)
    metrics: dict[str, float] = {}
    if run_id:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            metrics = dict(client.get_run(run_id).data.metrics)
    return metrics


def log_pareto(study: optuna.Study, spec: StudySpec, parent_id: str, experiment_id: str, trials: list[FrozenTrial],
               front: list[FrozenTrial], metrics: dict[int, dict[str, float]]) -> None:
    """A multi-objective study's Pareto front on its parent: ``pareto.csv`` (every
    Pareto-optimal trial: number, run, params, objectives), ``plots/optuna_pareto_front.png``
    (every trial, the front highlighted, infeasible ones apart) and one metric series per
    objective over the front, ``pareto/<metric>`` at step = rank on the first objective (MLflow's
    charts draw the trade-off); the front's runs tagged ``pareto=true`` and named ``... · pareto``,
    the other complete ones ``pareto=false``."""
    client = MlflowClient()
    ranked = sorted(front, key=lambda t: -t.values[0] if spec.directions[0] == "maximize" else t.values[0])
    rows = [{"rank": rank, "trial": t.number, "run_id": t.user_attrs.get(USER_ATTR_RUN_ID, ""),
             "warm_start_source": t.user_attrs.get(USER_ATTR_WARM_SOURCE, ""),
             **{f"param.{k}": v for k, v in t.params.items()}, **dict(zip(spec.metrics, t.values)),
             **{m: metrics[t.number].get(m) for m in ("model/size_mb", "time/predict_ms_per_image", "backbone.params")
                if m not in spec.metrics and metrics[t.number].get(m) is not None}}
            for rank, t in enumerate(ranked)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pareto.csv"
        pd.DataFrame(rows, columns=None if rows else ["rank", "trial", "run_id", *spec.metrics]).to_csv(path, index=False)
        client.log_artifact(parent_id, str(path))
    for rank, trial in enumerate(ranked):
        sink.log_batch(parent_id, metrics={f"pareto/{m}": v for m, v in zip(spec.metrics, trial.values)}, step=rank)
    # The front's size at the last trial's step: the live series of runs.sweep.log_progress ends there.
    last = max((t.number for t in trials), default=0)
    sink.log_batch(parent_id, metrics={"pareto/size": len(front)}, step=last, tags={
        "pareto_trials": ",".join(str(t.number) for t in sorted(front, key=lambda t: t.number))[:5000]})
    on_front = {t.number for t in front}
    for trial in trials:
        run_id = trial.user_attrs.get(USER_ATTR_RUN_ID)
        if trial.state != TrialState.COMPLETE or not run_id:
            continue
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.set_tag(run_id, "pareto", "true" if trial.number in on_front else "false")
            name = client.get_run(run_id).info.run_name or ""
            if trial.number in on_front and " · pareto" not in name:
                client.set_tag(run_id, "mlflow.runName", name.replace(" · best", "") + " · pareto")
            elif trial.number not in on_front and " · pareto" in name:
                client.set_tag(run_id, "mlflow.runName", name.replace(" · pareto", ""))
    if len(spec.metrics) in (2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = oplt.plot_pareto_front(study, target_names=list(spec.metrics))
                figure = axes.get_figure()
                figure.set_size_inches(8, 6)
                figure.tight_layout()
                plots.log_figure(figure, "plots/optuna_pareto_front.png", parent_id)
            except (ValueError, RuntimeError, IndexError) as error:
                client.set_tag(parent_id, "plot.pareto_front", f"skipped: {error}"[:250])
        plt.close("all")


def log_trials_table(study: optuna.Study, parent_id: str) -> None:
    """Every trial (params, value, state, times, user attributes) as ``trials.csv`` of the parent."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(path, index=False)
        MlflowClient().log_artifact(parent_id, str(path))


def log_optuna_plots(study: optuna.Study, spec: StudySpec, parent_id: str) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts of the parent; a plot that needs more trials is
    skipped (tagged ``plot.<name>``)."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots_ = {"optimization_history": oplt.plot_optimization_history,
              "parallel_coordinate": oplt.plot_parallel_coordinate, "slice": oplt.plot_slice}
    if len(finished) >= 2:
        plots_["param_importances"] = oplt.plot_param_importances
    if len(spec.space) == 2:
        plots_["contour"] = oplt.plot_contour
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots_["intermediate_values"] = oplt.plot_intermediate_values
    if spec.multi_objective:
        # Optuna's single-objective plots, on the first objective (the front has its own plot).
        first = functools.partial
        plots_ = {name: first(plot, target=lambda t: t.values[0], target_name=spec.metric)
                  for name, plot in plots_.items() if name != "intermediate_values"}
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots_.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as error:
                MlflowClient().set_tag(parent_id, f"plot.{name}", f"skipped: {error}"[:250])
                continue
            first = np.ravel(axes)[0] if isinstance(axes, np.ndarray) else axes
            figure = first.get_figure()
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            figure.tight_layout()
            plots.log_figure(figure, f"plots/optuna_{name}.png", parent_id)
            logged.append(name)
    plt.close("all")
    return logged
