"""``scenesweep report``: our figures beside the reference study's, as Markdown with PNG plots.

A thin wrapper over ``scenesweep.report.build.build_report``.
"""
from __future__ import annotations

import click

from .group import main, user_errors


@main.command("report")
@click.option("--out", default="reports/latest", show_default=True, metavar="FOLDER",
              help="report folder (replaced): report.md and figures/*.png")
@click.option("--log/--no-log", default=True, help="log the folder as artifacts of a `report` MLflow run")
@user_errors
def report(out: str, log: bool) -> None:
    """Write the report of every experiment (experiments/*.yaml) from the tracking store and Optuna.

    Each figure is set beside the study's, with the hardware it was measured on; demo figures
    are labelled as such; every experiment without a 15-Scene run is named with its command.
    Logs: report/report.md and report/figures/*.png on a run of the experiment "report".
    """
    from ..report.build import build_report

    built = build_report(out or "reports/latest", log=log)
    real = sum(s.setting == "real" for s in built.sections)
    click.echo(f"report {built.path}: {len(built.sections)} experiments ({real} on the real setting), "
               f"{len(built.missing)} missing run(s)" + (f"; logged in run {built.run_id}" if built.run_id else ""))
    for line in built.missing:
        click.echo(f"  missing: {line}")
