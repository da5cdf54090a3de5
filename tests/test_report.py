"""The report: produced from the demo runs of every experiment file, it holds each table, labels
demo figures as such, and names every missing run with the command that would produce it."""
import re

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from scenesweep.cli.main import main
from scenesweep.specs.experiments import experiment_files, load_experiment

from conftest import REPO, run_mlflow_project
from experiment_runs import demo_runs

pytestmark = pytest.mark.slow


def sections(markdown: str) -> dict[str, str]:
    """'## Q8/Q10: ...' heading -> its text."""
    parts = re.split(r"^## ", markdown, flags=re.MULTILINE)
    return {part.split("\n", 1)[0]: part for part in parts[1:]}


def section_of(markdown: str, question: str) -> str:
    found = [text for heading, text in sections(markdown).items() if heading.startswith(f"{question}:")]
    assert len(found) == 1, list(sections(markdown))
    return found[0]


def test_report_from_the_demo_runs_holds_each_table(tmp_path_factory, tmp_path, monkeypatch):
    runs = demo_runs(tmp_path_factory)
    runs.use(monkeypatch)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output[-4000:]
    markdown = (out / "report.md").read_text()
    experiments = [load_experiment(p) for p in experiment_files()]

    # Every experiment is in the summary and has a section, labelled as demo figures.
    for experiment in experiments:
        text = section_of(markdown, experiment.question)
        assert "(DEMO figures)" in text.split("\n", 1)[0]
        assert "**DEMO**" in text and "not a 15-Scene result" in text
        assert experiment.reference["figure"] in text  # the study's figure beside ours
    assert "real setting (" not in markdown

    # Q1: the parameter table.
    q1 = section_of(markdown, "Q1")
    assert "| total | 138,357,544 |" in q1 and "| 19 | fc6 | Fully connected | 25088 | 4096 |" in q1
    # Q3: top-5 per image; Q4: the grids, raw and thresholded.
    assert section_of(markdown, "Q3").count("probability") >= 1 and "figures/q3_" in markdown
    q4 = section_of(markdown, "Q4")
    assert q4.count("_maps.png)") == 2 and q4.count("_above_0.5.png)") == 2
    # Q8/Q10: accuracy against C, from the sweep's trials.
    q8 = section_of(markdown, "Q8/Q10")
    assert "accuracy_vs_params.png" in q8 and "| layer | trial |" in q8 and "89.15 % test" in q8
    # Q12.1: the fc-width table, with the study's points.
    q121 = section_of(markdown, "Q12.1")
    assert "| fc_width | trial |" in q121
    for width in ("| 4096 |", "| 8196 |", "| 16384 |"):
        assert width in q121
    assert "84.76 % test (C=0.012)" in q121
    # Q12.2: the head's run with its curves.
    q122 = section_of(markdown, "Q12.2")
    assert "best val acc (epoch)" in q122 and "curves.png" in q122
    # Q12.3: the pooling table with every column the study gives, and the curves.
    q123 = section_of(markdown, "Q12.3")
    for column in ("train acc", "val acc", "test acc", "best val acc (epoch)", "stable", "s/batch extraction",
                   "s/batch training", "study"):
        assert column in q123.split("| pooling |", 1)[1].split("\n", 1)[0], column
    for pooling in ("max", "avg", "lp1", "lp2"):
        row = [line for line in q123.splitlines() if line.startswith(f"| {pooling} | #")]
        assert len(row) == 1 and "%" in row[0], pooling
    assert "curves.png" in q123
    # Hardware of each measured figure.
    assert markdown.count(", flags ") >= 5  # the CPU's model and speed flags, per stage
    # Every linked figure exists.
    for link in re.findall(r"\]\((figures/[^)]+)\)", markdown) + re.findall(r'src="(figures/[^"]+)"', markdown):
        assert (out / link).is_file(), link
    # No 15-Scene run: each experiment is named with the command that would produce it.
    missing = markdown.split("## Missing runs", 1)[1].split("\n## ", 1)[0]
    for experiment in experiments:
        assert f"`{experiment.command()}`" in missing
    assert "--data path/to/15-Scene" in missing
    # The report is logged as an MLflow run.
    client = MlflowClient()
    report_runs = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    assert len(report_runs) == 1
    logged = {a.path for a in client.list_artifacts(report_runs[0].info.run_id, "report")}
    assert "report/report.md" in logged and "report/figures" in logged


def test_missing_runs_are_named_with_their_command_through_mlflow_run(store, tmp_path):
    out = tmp_path / "empty_report"
    result = run_mlflow_project("report", {"out": out})
    assert result.returncode == 0, result.stderr[-4000:]
    markdown = (out / "report.md").read_text()
    missing = markdown.split("## Missing runs", 1)[1].split("\n## ", 1)[0]
    for experiment in (load_experiment(p) for p in experiment_files()):
        assert f"`{experiment.command()}`" in missing, experiment.name
        assert f"`{experiment.command(demo=True)}`" in missing, experiment.name
        assert "No finished run" in section_of(markdown, experiment.question)
    assert "| **DEMO** |" not in markdown  # nothing ran: no figure at all, demo or real
    client = MlflowClient()
    # Under `mlflow run` the report re-attaches to the project's run (in the experiment it chose).
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="tags.`scenesweep.report` = 'true'")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "report"
    assert "report/report.md" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}


def test_a_real_run_is_shown_as_real_and_is_no_longer_missing(store, tmp_path):
    q1 = str(REPO / "experiments" / "q1_parameter_count.yaml")
    for args in (["--demo"], []):  # the demo first: the real run is shown although it is not the latest
        result = CliRunner().invoke(main, ["run", q1, *args])
        assert result.exit_code == 0, result.output[-3000:]
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--out", str(out), "--no-log"])
    assert result.exit_code == 0, result.output[-3000:]
    markdown = (out / "report.md").read_text()
    q1_text = section_of(markdown, "Q1")
    assert "real setting (weights=imagenet, image_size=224" in q1_text and "DEMO" not in q1_text.split("\n", 1)[0]
    assert "A demo run also exists" in q1_text
    missing = markdown.split("## Missing runs", 1)[1].split("\n## ", 1)[0]
    assert "q1_parameter_count" not in missing and "q8_svm_relu7.yaml --data path/to/15-Scene" in missing
