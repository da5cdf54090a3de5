"""The pipeline's commands: ``extract``, ``svm``, ``finetune`` (one tracked run each), ``sweep``
(an Optuna study) and ``describe`` (the parameter table). Thin wrappers: heavy modules are
imported inside the commands, so that ``scenesweep --help`` stays quick."""
from __future__ import annotations

from typing import Any

import click

from ..core.config import ENTRY_HEADS, PARAMETERS, make_config, run_parameters
from ..core.errors import RunFailedError, UserError
from .group import given, main, option, optional_number, parameter_options, clean_exit


def _single_run_command(entry_point: str, help_text: str) -> None:
    names = run_parameters(ENTRY_HEADS[entry_point])

    @main.command(entry_point, help=help_text)
    @parameter_options(names)
    @click.option("--register", default="", metavar="NAME",
                  help="also register the servable model under this registered-model name")
    @click.option("--progress/--no-progress", default=True, help="show progress bars")
    @clean_exit
    def command(register: str, progress: bool, **values: Any) -> None:
        from ..runs.single import track_single_run

        if entry_point == "extract" and register:
            raise UserError("--register: extract trains no model; use svm or finetune")
        run_id, result = track_single_run(entry_point, given(values), progress=progress, register=register)
        if result is None:
            click.echo(f"run {run_id}: features extracted")
        else:
            metrics = result.metrics
            click.echo(f"run {run_id}: train/acc={metrics['train/acc']:.4f} val/acc={metrics['val/acc']:.4f} "
                       f"test/acc={metrics['test/acc']:.4f}")


_single_run_command("extract", "Extract features of every image (cached) and log timings. "
                               "Logs: layer_table.md, config.yaml, dataset/manifest.json.")
_single_run_command("svm", "Linear SVM on cached features (study Q8/Q10). Logs metrics, "
                           "plots/confusion_matrix.png, the head model, config.yaml, dataset/manifest.json.")
_single_run_command("finetune", "Train the new classifier head on cached features (study Q11/Q12.2). "
                                "Logs per-epoch metrics, plots/curves.png, plots/confusion_matrix.png, the head model.")


@main.command("sweep")
@click.argument("study_file", type=click.Path())
@option("n_trials", default=None, help="trials in total for the study (resumes count) [default: the file's]")
@option("timeout", default=None, help="stop starting trials after this many seconds [default: the file's]")
@option("storage", default=None,
        help="Optuna storage URL [default: OPTUNA_STORAGE, else sqlite optuna.db beside the MLflow store]")
@option("study_name", default=None, help="Optuna study name [default: the file's]")
@option("n_jobs", default="1", help="trials in parallel threads in this process")
@option("heartbeat", default="30", help="seconds between trial heartbeats (a dead worker's trial fails after 2x)")
@click.option("--register/--no-register", default=True, help="register the best trial's servable model")
@click.option("--progress/--no-progress", default=True, help="show progress bars")
@parameter_options(tuple(p.name for p in PARAMETERS))
@clean_exit
def sweep(study_file: str, n_trials: str | None, timeout: str | None, storage: str | None, study_name: str | None,
          n_jobs: str, heartbeat: str, register: bool, progress: bool, **overrides: Any) -> None:
    """Run (or resume) the Optuna study of STUDY_FILE: one parent MLflow run, one nested run per trial.

    Other options override the file's fixed settings. Logs on the parent: the best trial's params
    and value, trials.csv, plots/optuna_*.png, test accuracy of the best trial (computed once),
    and registers its servable model.
    """
    from ..specs.studies import load_study

    # The file and the numbers first: a bad one is answered before torch and MLflow load (seconds).
    spec = load_study(study_file, given(overrides))
    budget = dict(n_trials=optional_number("n_trials", n_trials, int),
                  timeout=optional_number("timeout", timeout, float),
                  n_jobs=optional_number("n_jobs", n_jobs, int) or 1,
                  heartbeat_s=optional_number("heartbeat", heartbeat, int) or 30)
    from ..runs.study_outcome import summary_lines
    from ..runs.sweep import run_study

    outcome = run_study(spec, storage=storage or None, study_name=study_name or None, progress=progress,
                        register=register, **budget)
    for line in summary_lines(outcome, spec):
        click.echo(line)
    if outcome.error:
        # Every trial failed: the study has nothing to show, and says so with its exit status.
        raise RunFailedError(outcome.error)


@main.command("describe")
@parameter_options(("arch", "pooling", "fc_width", "image_size"))
@clean_exit
def describe(**values: Any) -> None:
    """Print the study's Q1 table: every layer with channels, weights, biases and output size
    (VGG as the study has it; other backbones by stage)."""
    from ..compute.backbone import format_layer_table, setting_layer_table

    config = make_config(None, {"image_size": 224, **given(values)})
    rows = setting_layer_table(config)
    click.echo(f"{config.arch}, pooling {config.pooling}, fc width {config.fc_width}, {config.image_size} px input\n")
    click.echo(format_layer_table(rows))
