"""One trial of a study as a nested MLflow run: the Objective Optuna's trials are handed to.

Each trial's run gets its params, the splits it read (``log_inputs``: the runs table's Dataset
column), its metrics (per epoch, and final in one ``log_batch``) and, on CUDA, its peak GPU
memory and utilisation; the trial gets an optuna-dashboard note linking its MLflow run.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna_dashboard import save_note

from ..compute import serving_cost
from ..compute.hardware import resolve_device
from ..compute.training import RunResult, fit_head, fit_head_folds, prepare
from ..core.config import data_parameters
from ..core.errors import UserError
from ..models.logged import model_size_mb, storage_precision
from ..models.pyfunc import serving_precision
from ..search.kept_heads import heads_folder, keep_if_best
from ..search.sampling import suggest
from ..search.trials import USER_ATTR_RUN_ID, USER_ATTR_WARM_SOURCE, is_own_setting, this_worker
from ..specs.studies import StudySpec
from ..tracking import lifecycle, provenance, sink

# Tags a trial's run takes from its parent: who ran it, from what source and commit.
INHERITED_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                  "mlflow.source.git.branch", "mlflow.source.git.repoURL", "mlflow.project.entryPoint")


def trial_run_name(study_name: str, number: int, params: dict[str, Any], metrics: dict[str, float] | None = None,
                   feasible: bool = True) -> str:
    """'svm-scenes #12 C=93.8 layer=pool5', and once it completed '... · val/acc 0.955' (each
    objective: '· val/acc 0.955 · time/predict_ms_per_image 3.1'), '· infeasible' when it broke a
    constraint: the study's name as given (``--study_name``), so two studies of one experiment
    read apart in the runs table."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    name = f"{study_name} #{number} {shown}"
    for metric, value in (metrics or {}).items():
        name += f" · {metric} {value:.3g}"
    return name if feasible else f"{name} · infeasible"


def trial_note(study_name: str, number: int, params: dict[str, Any], experiment_id: str, run_id: str,
               parent_run_id: str) -> str:
    """The trial's optuna-dashboard note (Markdown): its MLflow run and the study's parent, linked."""
    uri = mlflow.get_tracking_uri()
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    lines = [f"## Trial #{number} of `{study_name}`", "", shown, "",
             f"MLflow run: {provenance.ui_link(run_id, provenance.run_ui_path(experiment_id, run_id), uri)} "
             f"(experiment id `{experiment_id}`, run id `{run_id}`)", "",
             f"Study's parent run: "
             f"{provenance.ui_link(parent_run_id, provenance.run_ui_path(experiment_id, parent_run_id), uri)}"]
    hint = provenance.ui_hint(uri)
    return "\n".join(lines + (["", hint] if hint else [])) + "\n"


class Objective:
    """Runs one trial as a nested MLflow run; receives the study, its parent run and data once.

    Args:
        spec: the study file.
        study_name: the Optuna study's name (``--study_name`` may differ from the file's).
        parent_run_id, experiment_id: where the trial's runs go.
        data: the dataset and split checked before the first trial, reused by every trial whose
            data parameters are the study's fixed ones (None: each trial loads its own).
        progress: show progress bars (extraction).
        keep_best_per: besides the best trial's head, keep the best head of each value of this
            parameter (an experiment that scores each pooling type's best trial on test).
    """

    def __init__(self, spec: StudySpec, study_name: str, parent_run_id: str, experiment_id: str,
                 data=None, progress: bool = True, keep_best_per: str | None = None):
        self.spec = spec
        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.data = None if set(data_parameters()) & set(spec.space) else data
        self.progress = progress
        self.keep_best_per = keep_best_per
        # A pooling study's other pooling types: extracted in the first trial's pass, sharing the
        # layers before the first pooling (the trunk) instead of one whole pass each.
        pooling = spec.space.get("pooling")
        self.poolings = tuple(pooling.choices) if pooling is not None and pooling.type == "categorical" else ()
        self.client = MlflowClient()
        # MlflowClient.create_run adds none of the tags fluent runs get: the UI would show
        # "Created by -" and no source for every trial. Trials share their parent's.
        self.inherited_tags = {k: v for k, v in self.client.get_run(parent_run_id).data.tags.items()
                               if k in INHERITED_TAGS}
        self._hardware: dict[str, str] | None = None
        self._lock = threading.Lock()  # one extraction at a time when n_jobs > 1
        if self.data is not None:
            # The study's splits on its parent (each worker may log them: nothing is added twice).
            sink.log_datasets(parent_run_id, *self.data)

    def _create_run(self, trial: optuna.Trial, params: dict[str, Any], seed: int | None) -> str:
        worker = this_worker()
        note = (f"Trial #{trial.number} of study `{self.study_name}`: " + ", ".join(f"{k}={v}" for k, v in params.items())
                + "; objective " + ", ".join(f"{g.direction} {g.metric}" for g in self.spec.goals) + ".")
        run_id = lifecycle.create_run(
            self.experiment_id, trial_run_name(self.study_name, trial.number, params),
            {**self.inherited_tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, "study": self.study_name,
             "trial_number": str(trial.number), "entry_point": f"sweep:{self.spec.study}",
             "optuna.storage_study": self.study_name, "pid": str(worker["pid"]), "host": worker["host"],
             "sampler_seed": str(seed), "mlflow.note.content": note})
        trial.set_user_attr(USER_ATTR_RUN_ID, run_id)
        with contextlib.suppress(Exception):  # a note is a convenience, never why a trial fails
            save_note(trial, trial_note(self.study_name, trial.number, params, self.experiment_id, run_id,
                                        self.parent_run_id))
        return run_id

    def _fit(self, trial: optuna.Trial, run_id: str, config, prunable: bool = True) -> RunResult:
        """Features (cached), the head, per-epoch metrics reported to the pruner, final metrics;
        on CUDA the trial's peak GPU memory and utilisation (logged when pruned or failed too)."""
        gpu: dict[str, float] = {}
        device = resolve_device(config.device)  # once per trial: the features carry it down from here
        try:
            with provenance.gpu_usage(str(device)) as gpu:
                return self._fit_measured(trial, run_id, config, prunable, device)
        finally:
            if gpu:
                with contextlib.suppress(Exception):
                    sink.log_batch(run_id, metrics=gpu)

    def _fit_measured(self, trial: optuna.Trial, run_id: str, config, prunable: bool, device) -> RunResult:
        with self._lock:
            prepared = prepare(config, progress=self.progress, data=self.data, share_poolings=self.poolings,
                               device=device)
        if self._hardware is None:
            self._hardware = sink.hardware_tags(str(prepared.device))
        sink.log_batch(run_id, params={**sink.config_params(config), "head": config.head,
                                       "dataset_fingerprint": prepared.dataset.fingerprint,
                                       **sink.backbone_params(config), **sink.precision_params(prepared.features)},
                       tags={**sink.cache_tags(prepared.features), **self._hardware, **sink.unit_tags(config)})
        sink.log_datasets(run_id, prepared.dataset, prepared.split)
        log_epoch = sink.epoch_logger(run_id)
        metric = self.spec.metric

        def on_epoch(epoch: int, metrics: dict) -> None:
            log_epoch(epoch, metrics)
            if metric not in metrics:  # a cost objective: nothing to compare epoch by epoch
                return
            trial.report(metrics[metric], epoch)
            if prunable and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric}={metrics[metric]:.4f}")

        if self.spec.folds:
            fold_metric = f"fold/{metric}"

            def on_fold(fold: int, metrics: dict) -> None:
                log_epoch(fold, metrics)
                if fold_metric in metrics and not self.spec.multi_objective:
                    trial.report(metrics[fold_metric], fold)
                    if prunable and trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {fold}: {metric}={metrics[fold_metric]:.4f}")

            result = fit_head_folds(prepared, config, self.spec.folds, on_fold=on_fold)
        else:
            # Optuna prunes (and takes reports from) single-objective studies only.
            result = fit_head(prepared, config, on_epoch=log_epoch if self.spec.multi_objective else on_epoch)
        result.metrics.update(self._costs(result, config))
        sink.log_batch(run_id, metrics=sink.final_metrics(result), params=sink.head_precision_params(result),
                       step=len(result.history))
        return result

    def _costs(self, result: RunResult, config) -> dict[str, float]:
        """What the trial's servable model would cost: ``model/size_mb`` and ``backbone.params``
        (counted), and, when the study weighs it, ``time/predict_ms_per_image`` (the backbone's
        part measured once per shape and machine, the head's per trial)."""
        prepared = result.prepared
        extraction = prepared.features.precision
        costs = {"model/size_mb": model_size_mb(config, extraction, result.head),
                 "backbone.params": float(sink.backbone_params(config)["backbone.params"])}
        if self.spec.needs_metric("time/predict_ms_per_image"):
            served = serving_precision(storage_precision(extraction), prepared.device)
            backbone_ms, _ = serving_cost.backbone_ms(config.arch, config.pooling, config.fc_width, config.layer,
                                                      config.image_size, served, prepared.device,
                                                      config.cache_path)
            costs["time/predict_ms_per_image"] = backbone_ms + serving_cost.head_ms(
                result.head, prepared.features.values.shape[1])
        return costs

    def _constrain(self, trial: optuna.Trial, run_id: str, metrics: dict[str, float]) -> dict[str, float]:
        """The study's constraints on the trial (Optuna's ``trial.set_constraint``: samplers that
        use constraints read them, ``study.best_trial(s)`` leaves infeasible trials out); an
        infeasible trial's run is tagged ``feasible=false``. Returns the constraint values."""
        values = {str(c): c.value(metrics[c.metric]) for c in self.spec.constraints}
        for key, value in values.items():
            trial.set_constraint(key, value)
        if values:
            broken = [key for key, value in values.items() if value > 0]
            self.client.set_tag(run_id, "feasible", "false" if broken else "true")
            if broken:
                self.client.set_tag(run_id, "infeasible", "; ".join(broken))
        return values

    def _keep_head(self, trial: optuna.Trial, run_id: str, values: list[float], result: RunResult, config,
                   constraints: dict[str, float]) -> None:
        """The head, when the trial is the best so far (or on the Pareto front): the summary
        scores the test split with it, and ``scenesweep register --trial`` registers it."""
        try:
            kept = keep_if_best(trial, values, result.head, heads_folder(config.cache_path, self.parent_run_id),
                                self.spec.directions, self.keep_best_per, constraints)
        except (OSError, UserError) as error:  # a full disk: the summary refits this trial instead, and says so
            print(f"note: trial #{trial.number}'s head was not kept ({getattr(error, 'strerror', None) or error})",
                  file=sys.stderr)
            return
        if kept:
            self.client.set_tag(run_id, "head_kept", "true")

    def __call__(self, trial: optuna.Trial, seed: int | None = None) -> float | list[float]:
        """Run the trial; its objective (a list of one value per objective with several)."""
        params = suggest(trial, self.spec.space)
        # The study's own settings (enqueued: the reference study's points, or earlier runs' by a
        # warm start) run in full, as the file fixes them; tuning trials take the file's tuning
        # settings and may be pruned.
        own = is_own_setting(trial)
        config = self.spec.trial_config(params, tuning=not own)
        run_id = self._create_run(trial, params, seed)
        self.client.set_tag(run_id, "trial_kind", "own setting" if own else "tuning")
        source = trial.user_attrs.get(USER_ATTR_WARM_SOURCE)
        if source:
            self.client.set_tag(run_id, USER_ATTR_WARM_SOURCE, source)
        # FINISHED, or KILLED (pruned; Ctrl-C or SIGTERM), or FAILED with its error (a bug's
        # traceback beside the run, one line on the terminal).
        with lifecycle.ending(run_id, pruned=(optuna.TrialPruned,)):
            result = self._fit(trial, run_id, config, prunable=not own)
            values = [result.metrics[metric] for metric in self.spec.metrics]
            for metric, value in zip(self.spec.metrics, values):
                if not math.isfinite(value):
                    raise ValueError(f"{metric} is {value}")
            constraints = self._constrain(trial, run_id, result.metrics)
            self._keep_head(trial, run_id, values, result, config, constraints)
            self.client.set_tag(run_id, "mlflow.runName", trial_run_name(
                self.study_name, trial.number, params, dict(zip(self.spec.metrics, values)),
                feasible=all(v <= 0 for v in constraints.values())))
        return values if self.spec.multi_objective else values[0]
