"""``scenesweep report``: our figures beside the reference study's, as Markdown with PNG plots.

A thin wrapper over ``scenesweep.report.build.build_report``.
"""
from __future__ import annotations

import click

from .group import main, clean_exit


@main.command("report")
@click.option("--out", default="reports/latest", show_default=True, metavar="FOLDER",
              help="report folder (replaced): report.md and figures/*.png")
@click.option("--log/--no-log", default=True, help="log the folder as artifacts of a `report` MLflow run")
@clean_exit
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


@main.command("studies")
@click.option("--compare", nargs=2, default=None, metavar="STUDY STUDY",
              help="also draw these two studies' best-so-far curves in one PNG (in --out)")
@click.option("--out", default="", metavar="FOLDER",
              help="also write studies.md and studies.csv there (with --compare: default reports/studies)")
@clean_exit
def studies(compare: tuple[str, str] | None, out: str) -> None:
    """Every study in the tracking store side by side: trials complete, pruned, failed and
    running, the best objective and its trial, the test accuracy, the registered version, the
    wall time and the hardware, read from the studies' parent runs (a SQLite store or a tracking
    server: MLFLOW_TRACKING_URI)."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from ..core.errors import UserError
    from ..report import studies as side_by_side
    from .model_commands import _use_project_store

    _use_project_store()
    client = MlflowClient()
    rows = side_by_side.list_studies(client)
    if not rows:
        click.echo("no studies in the tracking store yet: run one, e.g. mlflow run . -e sweep_svm --env-manager local")
    else:
        click.echo(side_by_side.text_table(rows))
    folder = Path(out or ("reports/studies" if compare else "")) if (out or compare) else None
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder")
    chosen = []
    if compare:
        try:
            chosen = [side_by_side.find_study(rows, name) for name in compare]
        except LookupError as error:
            raise UserError(str(error)) from None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "studies.md").write_text(side_by_side.markdown_table(rows))
    (folder / "studies.csv").write_text(side_by_side.csv_text(rows))
    click.echo(f"wrote {folder / 'studies.md'} and {folder / 'studies.csv'}")
    if chosen:
        png = folder / f"compare-{'-vs-'.join(safe_name(r.study) for r in chosen)}.png"
        side_by_side.save_compare(client, chosen, png)
        click.echo(f"wrote {png}")


def safe_name(text: str) -> str:
    """A study name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60]
