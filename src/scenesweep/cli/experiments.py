"""``scenesweep run``: one experiment of the reference study from its file (experiments/*.yaml).

A thin wrapper: files are read by ``scenesweep.specs`` and run by ``scenesweep.runs.experiment``.
"""
from __future__ import annotations

from typing import Any

import click

from ..core.config import PARAMETERS
from ..core.errors import UserError
from .group import given, main, option, optional_number, parameter_options, clean_exit


@main.command("run")
@click.argument("experiment_file", type=click.Path())
@click.option("--demo", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[true|false]",
              help="run on the embedded default (digits, random weights, 32 px, small budgets) instead of "
                   "15-Scene at 224 px with ImageNet weights")
@click.option("--images", multiple=True, metavar="PATH",
              help="images for Q3/Q4 (repeatable, or comma-separated); absolute, from the working folder, "
                   "or inside --data [default: the file's, else a few picked from the dataset]")
@option("n_trials", default=None, help="trials in total for a study (resumes count) [default: the file's]")
@click.option("--timeout", default=None, help="a study stops starting trials after this many seconds")
@click.option("--threshold", default=None, help="Q4: a map pixel fires above this value [default: the file's, 2]")
@click.option("--top", default=None, help="Q3: classes shown per image [default: 5]")
@click.option("--register/--no-register", default=False, help="also register the servable model")
@click.option("--check", is_flag=True, help="validate the file and print what would run; run nothing")
@click.option("--progress/--no-progress", default=True, help="show progress bars")
@parameter_options(tuple(p.name for p in PARAMETERS))
@clean_exit
def run(experiment_file: str, demo: bool, images: tuple[str, ...], n_trials: str | None, timeout: str | None,
        threshold: str | None, top: str | None, register: bool, check: bool, progress: bool,
        **overrides: Any) -> None:
    """Run one experiment of the reference study from EXPERIMENT_FILE (experiments/*.yaml).

    The file states what differs from the study's setting (15-Scene given by --data PATH,
    ImageNet weights, 224 px, 100 training images per class); other options override any run
    parameter. Every run is tagged with the experiment, so `scenesweep report` finds it.
    """
    from ..runs.experiment import run as run_plan
    from ..specs.experiments import load_experiment
    from ..specs.plans import plan as plan_experiment

    experiment = load_experiment(experiment_file)
    options: dict[str, Any] = {
        "images": tuple(part for item in images for part in item.split(",") if part),
        "n_trials": optional_number("n_trials", n_trials, int),
        "timeout": optional_number("timeout", timeout, float),
        "top": optional_number("top", top, int),
    }
    if threshold not in (None, ""):
        try:
            options["threshold"] = float(threshold)
        except ValueError:
            raise UserError(f"--threshold={threshold!r}: expected a number") from None
    plan = plan_experiment(experiment, demo=demo, overrides=given(overrides), options=options)
    title = f"{experiment.question} {experiment.title}".strip()
    click.echo(f"experiment {experiment.name} ({title}): {plan.describe()}")
    if plan.spec is not None:
        click.echo(f"study {plan.spec.path} as Optuna study {plan.study_name!r}")
    if plan.images:
        click.echo("images: " + ", ".join(str(p) for p in plan.images))
    if check:
        click.echo("checked: nothing run (--check)")
        return
    outcome = run_plan(plan, progress=progress, register=register)
    for line in outcome.lines:
        click.echo(line)
