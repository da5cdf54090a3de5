"""The report: our figures beside the reference study's, from the tracking store and Optuna.

For every experiment file (``experiments/*.yaml``) the report looks up its latest finished runs
(tagged ``scenesweep.experiment`` by ``scenesweep run``; a study's parent run launched directly
with ``scenesweep sweep`` counts too) and shows them in the way the study did:

  * ``describe`` (Q1): the parameter table and its totals;
  * ``imagenet`` (Q3): the top classes of each image;
  * ``featuremaps`` (Q4): the grids of maps, raw and thresholded;
  * a single ``run`` (Q12.2): train, validation and test accuracy, the epoch of the best
    validation accuracy, stability, seconds per batch, and the curves per epoch;
  * a ``study`` (Q8/Q10, Q12.1, Q12.3): every trial (read from the Optuna storage), the best
    trial of each value of the file's ``test_per`` key with the same columns, accuracy against
    each numeric dimension of the search space (e.g. C), and the curves per epoch.

Each figure is set beside the study's (the file's ``reference``), with the hardware it was
measured on. A real (15-Scene) run is preferred; a demo run (digits or random weights) is shown
only when there is no real one, and then is labelled as a demo figure everywhere. Every
experiment without a real run is named with the command that would produce it.
"""
from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ..core.errors import UserError
from ..specs.experiments import experiment_files, load_experiment
from ..tracking import lifecycle, mlflow_store, provenance, sink
from .cost import cost_section
from .finding import all_experiment_ids, find_runs
from .reading import DEMO_LABEL, table
from .sections import Page, Section, section
from .studies import csv_text, list_studies, markdown_table

REPORT_EXPERIMENT = "report"


@dataclasses.dataclass
class Report:
    """What ``build_report`` wrote: the Markdown file, the run it was logged in, the sections."""

    path: Path
    run_id: str
    sections: list[Section]
    missing: list[str]


def build_report(out: str | Path = "reports/latest", experiments_dir: str | Path | None = None,
                 log: bool = True) -> Report:
    """Write ``out/report.md`` and ``out/figures/*.png`` and log the folder in a ``report`` run.

    Args:
        out: the report folder (replaced).
        experiments_dir: where the experiment files are (default: the project's experiments/).
        log: also log the folder as artifacts of a new MLflow run in experiment "report".
    """
    out = Path(out)
    if out.exists():
        # Replace an earlier report only: never wipe a folder that holds something else.
        if not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file()):
            raise UserError(f"--out {out}: exists and is not a report folder (no report.md); "
                            "choose a new or an earlier report's folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mlflow_store.setup_tracking()
    client = MlflowClient()
    experiment_ids = all_experiment_ids(client)
    experiments = [load_experiment(p) for p in experiment_files(experiments_dir)]
    page = Page(out, client, Path(tempfile.mkdtemp(prefix="scenesweep-report-")))
    page.figures.mkdir(parents=True, exist_ok=True)
    try:
        sections = [section(page, find_runs(client, e, experiment_ids)) for e in experiments]
        costs = cost_section(client, page.figures, page.downloads / "pareto")
    finally:
        shutil.rmtree(page.downloads, ignore_errors=True)
    missing = [line for s in sections for line in s.missing]
    studies = list_studies(client)
    markdown = render(sections, missing) + costs + studies_section(studies)
    path = out / "report.md"
    path.write_text(markdown)
    (out / "studies.csv").write_text(csv_text(studies))
    run_id = ""
    if log:
        with lifecycle.start_run(REPORT_EXPERIMENT, "report", tags={"scenesweep.report": "true",
                                                                 "command": provenance.command_line()},
                             system_metrics=False) as run:
            run_id = run.info.run_id
            mlflow.log_artifacts(str(out), "report")
            sink.log_batch(run_id, metrics={"report/experiments": len(sections),
                                                "report/real": sum(s.setting == "real" for s in sections),
                                                "report/demo": sum(s.setting == "DEMO" for s in sections),
                                                "report/missing": len(missing)})
    return Report(path, run_id, sections, missing)


def render(sections: list[Section], missing: list[str]) -> str:
    """The Markdown: summary table, missing runs, one section per experiment."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = ["# Our figures beside the reference study's", "",
             f"Generated {now} from the tracking store `{mlflow.get_tracking_uri()}` and the Optuna storages its "
             "sweep runs name. The study: VGG16 (ImageNet weights) on 15-Scene, 100 training images per class, "
             "224 px, mini-batches of 8 (see `reference/`).", "",
             f"**{DEMO_LABEL}** marks demo figures (scikit-learn digits and/or random VGG16 weights, small images): "
             "they check the pipeline, and are never 15-Scene results. Unlike the study, selection (C, epochs, "
             "pooling settings) reads a validation split carved from the training images; test accuracy is "
             "computed once, after selection.", "",
             "## Summary", "",
             table(["#", "experiment", "study's figure", "our figure", "setting", "measured on"],
                   [[s.found.experiment.question, s.found.experiment.title,
                     s.found.experiment.reference.get("figure", "") or "–", s.our_figure,
                     f"**{s.setting}**" if s.setting == DEMO_LABEL else s.setting, s.hardware]
                    for s in sections]), "",
             "## Missing runs", ""]
    lines += [f"- {m}" for m in missing] or ["None: every experiment has a finished run on the real setting."]
    lines.append("")
    for s in sections:
        experiment = s.found.experiment
        label = f" ({DEMO_LABEL} figures)" if s.setting == DEMO_LABEL else ""
        lines += [f"## {experiment.question}: {experiment.title}{label}", "",
                  f"{experiment.description}" if experiment.description else "",
                  f"File `{experiment.display_path()}`.", "", s.body, ""]
    return "\n".join(lines) + "\n"


def studies_section(studies: list) -> str:
    """Every study in the store side by side (``scenesweep studies``; also as studies.csv)."""
    if not studies:
        return ""
    return ("## Studies in the tracking store\n\nEvery study's parent run, oldest first (`scenesweep studies`; "
            "the same rows in `studies.csv`). Studies on demo data are demo figures.\n\n" + markdown_table(studies))
