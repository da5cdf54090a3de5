"""Optuna studies tracked in MLflow: one parent run per invocation, one nested run per trial.

* Trials share the feature cache (and an in-process memo), so a 50-trial SVM sweep extracts
  once; an fc-width sweep computes the convolutions once and only fc6/fc7 per width.
* Children are created with ``MlflowClient`` and an explicit ``parent_run_id`` tag, so they
  are linked with ``n_jobs > 1`` too (the fluent active run is per thread); their metrics go
  in one ``log_batch`` each.
* The Optuna storage is an RDB (SQLite by default, any SQLAlchemy URL) with heartbeats: a
  trial whose process was killed is failed at the next run, its parameters retried, and its
  MLflow run (and the dead process's parent run) marked FAILED.
* Selection reads the validation metric only; test accuracy is computed once, for the best
  trial, and logged on the parent.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from . import tracking
from .config import ConfigError, repo_root
from .studies import Dimension, StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLERS = {
    "tpe": lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, **kw),
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed),
}
PRUNERS = {
    "none": lambda **kw: optuna.pruners.NopPruner(),
    "median": lambda **kw: optuna.pruners.MedianPruner(**kw),
    "successive_halving": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(**kw),
    "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(**kw),
}
USER_ATTR_RUN_ID = "mlflow_run_id"
# Tags a trial's run takes from its parent: who ran it, from what source and commit.
INHERITED_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                  "mlflow.source.git.branch", "mlflow.source.git.repoURL", "mlflow.project.entryPoint")
DEFAULT_HEARTBEAT_S = 30


def default_storage() -> str:
    """``optuna.db`` beside the MLflow SQLite store (so temporary stores stay together)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else repo_root() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').as_posix()}"


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """Ask the trial for one value per space dimension."""
    params = {}
    for name, dim in space.items():
        if dim.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
    return params


def trial_run_name(spec: StudySpec, number: int, params: dict[str, Any]) -> str:
    """'sweep_svm #7 C=0.012 layer=relu7'."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"{spec.study} #{number} {shown}"


def _fail_run(client: MlflowClient, run_id: str, reason: str) -> None:
    """Mark a run FAILED (with why) unless it already ended."""
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_tag(run_id, "error", reason)
        client.set_terminated(run_id, "FAILED")


class Objective:
    """Runs one trial as a nested MLflow run; receives the study spec and parent run once."""

    def __init__(self, spec: StudySpec, parent_run_id: str, experiment_id: str, progress: bool = True):
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.progress = progress
        self.client = MlflowClient()
        # MlflowClient.create_run adds none of the tags fluent runs get: the UI would show
        # "Created by -" and no source for every trial. Trials share their parent's.
        self.inherited_tags = {k: v for k, v in self.client.get_run(parent_run_id).data.tags.items()
                               if k in INHERITED_TAGS}
        self._hardware: dict[str, str] | None = None
        self._lock = threading.Lock()  # one extraction at a time when n_jobs > 1

    def __call__(self, trial: optuna.Trial) -> float:
        from .training import fit_head, prepare

        params = suggest(trial, self.spec.space)
        config = self.spec.trial_config(params)
        run = self.client.create_run(
            self.experiment_id, run_name=trial_run_name(self.spec, trial.number, params),
            tags={**self.inherited_tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, "study": self.spec.study,
                  "trial_number": str(trial.number), "entry_point": f"sweep:{self.spec.study}",
                  "optuna.storage_study": self.spec.study, "pid": str(os.getpid()),
                  "host": socket.gethostname(),
                  "mlflow.note.content": f"Trial #{trial.number} of study `{self.spec.study}`: "
                                         + ", ".join(f"{k}={v}" for k, v in params.items())
                                         + f"; objective {self.spec.direction} {self.spec.metric}."})
        run_id = run.info.run_id
        trial.set_user_attr(USER_ATTR_RUN_ID, run_id)
        try:
            with self._lock:
                prepared = prepare(config, progress=self.progress)
            if self._hardware is None:
                self._hardware = tracking.hardware(prepared.features.device)
            tracking.log_batch(run_id, params={**tracking.config_params(config), "head": config.head,
                                               "dataset_fingerprint": prepared.dataset.fingerprint},
                               tags={"cache_key": prepared.features.key,
                                     "cache": "hit" if prepared.features.hit else "miss",
                                     "conv_cache": "hit" if prepared.features.conv_hit else "miss",
                                     **{f"hardware.{k}": v for k, v in self._hardware.items()},
                                     **tracking.unit_tags(config)})
            log_epoch = tracking.epoch_logger(run_id)

            def on_epoch(epoch: int, metrics: dict) -> None:
                log_epoch(epoch, metrics)
                trial.report(metrics[self.spec.metric], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.spec.metric}={metrics[self.spec.metric]:.4f}")

            result = fit_head(prepared, config, on_epoch=on_epoch)
            per_epoch = set(result.history[-1]) if result.history else set()
            tracking.log_batch(run_id, metrics={**{k: v for k, v in result.metrics.items() if k not in per_epoch},
                                                **tracking.timing_metrics(result.timings)},
                               step=len(result.history))
            value = result.metrics[self.spec.metric]
            if not math.isfinite(value):
                raise ValueError(f"{self.spec.metric} is {value}")
        except optuna.TrialPruned as pruned:
            self.client.set_tag(run_id, "pruned", str(pruned) or "true")
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as error:
            self.client.set_tag(run_id, "error", f"{error.__class__.__name__}: {error}"[:5000])
            # Ctrl-C stops the study: the trial was interrupted, not broken.
            self.client.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return value


class TrialBudget:
    """Stops the study once ``n_trials`` trials have finished in total, across processes.

    Finished means complete, pruned or failed, except a failed trial whose parameters were
    retried (a killed process): its retry counts instead.
    """

    def __init__(self, n_trials: int | None):
        self.n_trials = n_trials

    def finished(self, study: optuna.Study) -> int:
        trials = study.get_trials(deepcopy=False)
        retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
        return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and t.number not in retried))

    def remaining(self, study: optuna.Study) -> int | None:
        return None if self.n_trials is None else max(0, self.n_trials - self.finished(study))

    def __call__(self, study: optuna.Study, trial) -> None:
        if self.n_trials is not None and self.finished(study) >= self.n_trials:
            study.stop()


def stale_trial_callback(study: optuna.Study, trial) -> None:
    """A trial whose process died: mark its MLflow run FAILED, then retry its parameters."""
    run_id = trial.user_attrs.get(USER_ATTR_RUN_ID)
    if run_id:
        _fail_run(MlflowClient(), run_id, "process died mid-trial (Optuna heartbeat stale); parameters retried")
    optuna.storages.RetryFailedTrialCallback(max_retry=2)(study, trial)


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for locks instead of failing at once."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings(), tracking.sqlite_creation_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=2 * heartbeat_s,
                                              heartbeat_stale_trial_callback=stale_trial_callback)
        except Exception as error:  # SQLAlchemy: bad URL, missing driver, unreachable server
            raise ConfigError(f"storage={url!r}: cannot open the Optuna storage "
                              f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]})") from None


def fail_dead_parent_runs(client: MlflowClient, experiment_id: str, study: str) -> list[str]:
    """Parent runs of this study left RUNNING by a killed process on this host: mark FAILED.

    (Their trials' runs are failed by the Optuna heartbeat, which also retries the trials.)
    """
    host = socket.gethostname()
    failed = []
    runs = client.search_runs([experiment_id], filter_string=f"tags.study = '{study}' and tags.sweep = 'parent' and attributes.status = 'RUNNING'")
    for run in runs:
        pid = run.data.tags.get("pid")
        if run.data.tags.get("host") != host or not pid or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still alive: another worker
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _fail_run(client, run.info.run_id, f"process {pid} ended without closing this run (killed)")
        failed.append(run.info.run_id)
    return failed


# Settings that do not change what a trial measures: a study may resume with other values.
SETTING_FREE = ("cache_dir", "device", "batch_size")


def study_setting(spec: StudySpec) -> dict[str, str]:
    """The fixed settings a study's trials were measured under (data, weights, image size, ...)."""
    config = spec.trial_config({})
    return {k: str(v) for k, v in config.values.items() if k not in spec.space and k not in SETTING_FREE}


def check_same_setting(study: optuna.Study, spec: StudySpec, storage_url: str) -> None:
    """Record the setting of a new study; refuse to resume one made under another setting.

    Resuming a digits demo study with ``data=15-Scene`` would mix trials measured on two
    datasets (and could run no new trial at all): say so and how to start a new study instead.

    Raises:
        ConfigError: naming the settings that differ.
    """
    setting = study_setting(spec)
    recorded = study.user_attrs.get("setting")
    if recorded is None:
        study.set_user_attr("setting", setting)
        return
    differ = {k: (recorded.get(k), v) for k, v in setting.items() if recorded.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(differ.items()))
        raise ConfigError(f"study {study.study_name!r} in {storage_url} was run under other settings ({shown}); "
                          "resume it with the same settings, or start a new study with --study_name NAME "
                          "(MLproject: -P study_name=NAME)")


def run_study(spec: StudySpec, storage: str | None = None, study_name: str | None = None,
              n_trials: int | None = None, timeout: float | None = None, n_jobs: int = 1,
              heartbeat_s: int = DEFAULT_HEARTBEAT_S, progress: bool = True, register: bool = True) -> dict:
    """Run (or resume) the study of ``spec`` under one parent MLflow run.

    Returns:
        A summary: parent run id, study name, trials finished, best trial number, params and
        value, best run id, test accuracy of the best trial.
    """
    storage_url = storage or default_storage()
    study_name = study_name or spec.study
    n_trials = n_trials if n_trials is not None else spec.n_trials
    timeout = timeout if timeout is not None else spec.timeout
    budget = TrialBudget(n_trials)
    rdb = open_storage(storage_url, heartbeat_s)
    sampler_options = {k: v for k, v in spec.sampler.items() if k not in ("name", "seed")}
    sampler = SAMPLERS[spec.sampler["name"]](spec.sampler.get("seed"), **sampler_options)
    pruner = PRUNERS[spec.pruner["name"]](**{k: v for k, v in spec.pruner.items() if k != "name"})
    study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler, pruner=pruner,
                                direction=spec.direction, load_if_exists=True)
    # optuna-dashboard labels the objective axis with this ("Objective 0" otherwise).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.metric])
    study.set_user_attr("mlflow_experiment", spec.experiment)
    study.set_user_attr("description", spec.description)
    check_same_setting(study, spec, storage_url)
    if not study.get_trials(deepcopy=False):
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)

    tracking.setup_tracking()
    client = MlflowClient()
    with tracking.start_run(spec.experiment, f"{spec.study} study",
                            tags={"study": study_name, "study_file": str(spec.path), "pid": str(os.getpid()),
                                  "host": socket.gethostname(), "optuna.storage": storage_url,
                                  "entry_point": f"sweep:{spec.study}", "sweep": "parent"}) as parent:
        parent_id = parent.info.run_id
        experiment_id = parent.info.experiment_id
        if not client.get_experiment(experiment_id).tags.get("mlflow.note.content"):
            # The experiments list shows it in its Description column.
            client.set_experiment_tag(experiment_id, "mlflow.note.content", spec.description)
        fail_dead_parent_runs(client, experiment_id, study_name)
        mlflow.set_tag("mlflow.note.content", f"Study `{study_name}` from `{spec.path}`\n\n"
                       f"Command: `{tracking.command_line()}`\n\n{spec.description}")
        tracking.log_batch(parent_id, params={"study_name": study_name, "tunes": spec.tunes,
                                              "objective": f"{spec.direction} {spec.metric}",
                                              "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
                                              "n_trials": n_trials, "timeout": timeout, "n_jobs": n_jobs,
                                              **{f"fixed.{k}": v for k, v in spec.fixed.items()},
                                              **{f"space.{k}": _describe(d) for k, d in spec.space.items()}})
        mlflow.log_artifact(str(spec.path), "study")
        objective = Objective(spec, parent_id, experiment_id, progress=progress)
        remaining = budget.remaining(study)
        if remaining is None or remaining > 0:
            study.optimize(objective, n_trials=None if n_trials is None else remaining, timeout=timeout,
                           n_jobs=n_jobs, catch=(Exception,), callbacks=[budget], gc_after_trial=False,
                           show_progress_bar=progress and n_jobs == 1)
        summary = summarise(study, spec, parent_id, client, register=register, progress=progress)
        summary["trials_finished"] = budget.finished(study)
        return summary


def _describe(dim: Dimension) -> str:
    if dim.type == "categorical":
        return "{" + ", ".join(map(str, dim.choices)) + "}"
    return f"{dim.type}[{dim.low:g}, {dim.high:g}]" + (" log" if dim.log else "")


def summarise(study: optuna.Study, spec: StudySpec, parent_id: str, client: MlflowClient,
              register: bool = True, progress: bool = True) -> dict:
    """Best trial, trials table, plots, and the one test evaluation, logged on the parent."""
    from .training import evaluate_test_split, fit_head, prepare

    trials = study.get_trials(deepcopy=False)
    summary = {"parent_run_id": parent_id, "study": study.study_name, "trials": len(trials),
               "states": {s.name: sum(t.state == s for t in trials) for s in TrialState}}
    frame = study.trials_dataframe()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    log_optuna_plots(study, spec)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        mlflow.set_tag("best_trial", "none: no trial completed")
        return summary
    best = study.best_trial
    best_run_id = best.user_attrs.get(USER_ATTR_RUN_ID, "")
    # Workers sharing the study summarise at the same time: each marks its own trials, and
    # every one marks the best (a tag written twice at once can collide on SQLite: retried).
    own_runs = {r.info.run_id for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
        max_results=10000)}
    if best_run_id:
        _set_tag_retrying(client, best_run_id, "best_trial", "true")
    for other in completed:
        other_run = other.user_attrs.get(USER_ATTR_RUN_ID)
        if other_run in own_runs and other_run != best_run_id:
            _set_tag_retrying(client, other_run, "best_trial", "false")
    mlflow.set_tags({"best_trial": str(best.number), "best_run_id": best_run_id})
    tracking.log_batch(parent_id, metrics={f"best/{spec.metric}": best.value,
                                           "trials/complete": summary["states"]["COMPLETE"],
                                           "trials/pruned": summary["states"]["PRUNED"],
                                           "trials/failed": summary["states"]["FAIL"]},
                       params={f"best.{k}": v for k, v in best.params.items()})
    # The one test evaluation: the best trial's configuration, refitted (features from the cache).
    config = spec.trial_config(best.params)
    prepared = prepare(config, progress=progress)
    result = fit_head(prepared, config)
    test_metrics, confusion = evaluate_test_split(prepared, result.head)
    result.metrics.update(test_metrics)
    result.confusion = confusion
    tracking.log_batch(parent_id, metrics={**test_metrics, "best/val/acc_refit": result.metrics["val/acc"]})
    tracking.log_figure(tracking.confusion_figure(confusion, prepared.dataset.classes,
                                                  f"{spec.study}: best trial #{best.number}, test"),
                        "plots/confusion_matrix.png")
    if result.history:
        tracking.log_figure(tracking.curves_figure(result.history, f"best trial #{best.number}"), "plots/curves.png")
    mlflow.log_dict(config.as_dict(), "best_config.yaml")
    # The UI shows the first lines of a description: the result first, then how it was obtained.
    description = (f"Best trial #{best.number}: {spec.metric} = {best.value:.4f} with "
                   + ", ".join(f"{k}={v}" for k, v in best.params.items())
                   + f"; test/acc = {test_metrics['test/acc']:.4f} (computed once, for this trial)\n\n"
                   f"{spec.description}\n\nStudy `{study.study_name}` from `{spec.path}`\n\n"
                   f"Command: `{tracking.command_line()}`")
    mlflow.set_tag("mlflow.note.content", description)
    summary.update({"best_trial": best.number, "best_params": best.params, "best_value": best.value,
                    "best_run_id": best_run_id, "test_acc": test_metrics["test/acc"], "result": result})
    if register and spec.register:
        from .registry import register_result

        summary["model_version"] = register_result(parent_id, result, spec.register, extra_tags={
            "study": study.study_name, "trial_number": str(best.number), "trial_run_id": best_run_id})
    return summary


def _set_tag_retrying(client: MlflowClient, run_id: str, key: str, value: str) -> None:
    """set_tag, once more if another process inserted the same tag between read and write."""
    try:
        client.set_tag(run_id, key, value)
    except mlflow.exceptions.MlflowException:
        client.set_tag(run_id, key, value)


def log_optuna_plots(study: optuna.Study, spec: StudySpec) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts; a plot that needs more trials is skipped."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = {"optimization_history": oplt.plot_optimization_history,
             "parallel_coordinate": oplt.plot_parallel_coordinate, "slice": oplt.plot_slice}
    if len(finished) >= 2:
        plots["param_importances"] = oplt.plot_param_importances
    if len(spec.space) == 2:
        plots["contour"] = oplt.plot_contour
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = oplt.plot_intermediate_values
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as error:
                mlflow.set_tag(f"plot.{name}", f"skipped: {error}"[:250])
                continue
            first = np.ravel(axes)[0] if isinstance(axes, np.ndarray) else axes
            figure = first.get_figure()
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            figure.tight_layout()
            tracking.log_figure(figure, f"plots/optuna_{name}.png")
            logged.append(name)
    plt.close("all")
    return logged
