"""Experiment files (experiments/*.yaml): each loads, validates and runs at demo size against a
temporary store; bad files fail before anything runs, naming the file and the key.

Tests loop over the experiments/ folder, so a new file is tested for free.
"""
import csv
import json
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from scenesweep.cli.main import main
from scenesweep.core.errors import ConfigError
from scenesweep.specs.experiments import (DEMO_SETTING, REAL_SETTING, TAG_EXPERIMENT, experiment_files,
                                         load_experiment)
from scenesweep.specs.plans import plan
from scenesweep.compute.featuremaps import first_conv_maps

from helpers import REPO, assert_clear_error, run_cli, run_mlflow_project
from experiment_runs import EXPERIMENT_FILES, demo_runs

EXPECTED = {"q1_parameter_count", "q3_imagenet_predictions", "q4_first_conv_maps", "q8_svm_relu7",
            "q12_1_fc_width", "q12_2_head_pool5", "q12_3_pooling"}


def invoke(*args: str) -> subprocess.CompletedProcess:
    """The CLI in-process; the result looks like a finished subprocess."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def runs_of(name: str):
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.`{TAG_EXPERIMENT}` = '{name}'")


def test_every_experiment_of_the_study_has_a_file():
    assert {p.stem for p in EXPERIMENT_FILES} >= EXPECTED


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.stem)
def test_each_file_validates_and_resolves_to_the_real_and_the_demo_setting(path, flat_scenes, tmp_path):
    experiment = load_experiment(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert path.read_text().startswith("# ")
    assert any(f"scenesweep run experiments/{path.name}" in line for line in header), "the command comes first"
    real = plan(experiment, overrides={"data": str(flat_scenes), "train_per_class": 10})
    demo = plan(experiment, demo=True, overrides={"cache_dir": str(tmp_path / "cache")})
    for name, value in {**REAL_SETTING, "train_per_class": 10}.items():  # the command line wins
        if experiment.kind != "study" or name not in experiment.study_spec().space:
            assert real.config.values[name] == value, name
    assert real.setting == "real" and demo.setting == "demo"
    assert demo.config.weights == DEMO_SETTING["weights"] and demo.config.image_size == DEMO_SETTING["image_size"]
    if experiment.uses_data:
        assert demo.config.data == "digits"
    if experiment.kind == "study":
        # A demo never resumes (or pollutes) the study of the real setting.
        assert real.study_name != demo.study_name and real.study_name.startswith(real.spec.study + "@")
    if experiment.kind in ("imagenet", "featuremaps"):
        assert demo.images and all(p.is_file() for p in demo.images)
        assert all("digits" in str(p) for p in demo.images)


def test_the_real_setting_needs_the_dataset():
    experiment = load_experiment(REPO / "experiments" / "q8_svm_relu7.yaml")
    with pytest.raises(ConfigError, match="q8_svm_relu7.yaml: data: .*--data path/to/15-Scene"):
        plan(experiment)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.stem)
def test_each_experiment_runs_at_demo_size(path, tmp_path_factory, monkeypatch):
    runs = demo_runs(tmp_path_factory)
    runs.use(monkeypatch)
    experiment = load_experiment(path)
    found = runs_of(experiment.name)
    assert len(found) == 1, [r.info.run_name for r in found]
    run = found[0]
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["scenesweep.setting"] == "demo"
    assert tags["scenesweep.command"] == experiment.command(demo=True)
    client = MlflowClient()
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    if experiment.kind == "describe":
        assert metrics["params/total"] == 138_357_544 and metrics["params/biases"] == 13_416
        assert "layer_table.md" in files
    elif experiment.kind == "imagenet":
        records = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="predictions.json")).read_text())
        assert len(records) == 2 and all(len(r["top"]) == 5 for r in records)
        assert all(0 <= e["index"] < 1000 and e["name"] for r in records for e in r["top"])
        assert "time/predict_s" in metrics and tags["hardware.cpu"]
    elif experiment.kind == "featuremaps":
        maps = {a.path for a in client.list_artifacts(run.info.run_id, "featuremaps")}
        assert len([m for m in maps if m.endswith("_maps.png")]) == 2
        assert len([m for m in maps if m.endswith("_above_0.5.png")]) == 2  # the demo's threshold
        assert len({a.path for a in client.list_artifacts(run.info.run_id, "images")}) == 2
    elif experiment.kind == "run":
        for name in ("train/acc", "val/acc", "test/acc"):
            assert name in metrics, name
        # Its features' timing: the extraction it ran, or its read of the cache another run filled.
        assert "time/extract_batch_mean_s" in metrics or "time/cache_read_s" in metrics
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert sorted(set(steps)) == list(range(1, experiment.demo["epochs"] + 1))
    else:
        assert tags["sweep"] == "parent" and "@" in tags["study"]
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'")
        assert len(children) == experiment.demo["n_trials"]
        key = experiment.options["test_per"]
        tested = [c for c in children if "test/acc" in c.data.metrics]
        # One test evaluation per value of the key, on the best trial of that value.
        assert sorted(c.data.params[key] for c in tested) == sorted({c.data.params[key] for c in children})
        assert all(c.data.tags["test_evaluated"].startswith(f"best trial of {key}=") for c in tested)
    output = runs.outputs[experiment.name]
    assert "DEMO setting" in output, output[-2000:]


def test_pooling_convolutions_run_once_per_pooling_type(tmp_path_factory, monkeypatch):
    runs = demo_runs(tmp_path_factory)
    runs.use(monkeypatch)
    client = MlflowClient()
    parent = runs_of("q12_3_pooling")[0]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    conv = {}
    for child in children:
        conv.setdefault(child.data.params["pooling"], []).append(child.data.tags["conv_cache"])
    assert sorted(conv) == ["avg", "lp1", "lp2", "max"]
    assert all(states.count("miss") <= 1 for states in conv.values())


def logged_runs():
    """Every run in the test's store (conftest creates the store itself, empty)."""
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_demo_takes_an_optional_value_and_check_runs_nothing(store):
    path = str(REPO / "experiments" / "q12_2_head_pool5.yaml")
    demo = invoke("run", path, "--demo", "--check")
    assert demo.returncode == 0 and "DEMO setting" in demo.stdout and "data=digits" in demo.stdout
    explicit = invoke("run", path, "--demo", "true", "--epochs", "2", "--check")
    assert explicit.returncode == 0 and "DEMO setting" in explicit.stdout
    assert_clear_error(invoke("run", path, "--demo", "false", "--check"), "q12_2_head_pool5.yaml", "data:")
    assert not logged_runs()  # nothing was run


BAD_FILES = [
    ("kind: describe\nbogus: 1\n", "unknown key 'bogus'"),
    ("run: svm\nparams: {Cc: 1}\n", "params.Cc: unknown run parameter for head svm"),
    ("run: svm\nparams: {C: 0}\n", "params.C: C=0: expected a value > 0"),
    ("run: finetune\nparams: {pooling: median}\n", "params.pooling: pooling='median'"),
    ("study: sweeps/svm_c.yaml\nparams: {C: 1}\n", "params.C: searched by the study"),
    ("study: sweeps/svm_c.yaml\ntest_per: lr\n", "test_per='lr'"),
    ("study: sweeps/nowhere.yaml\n", "study: "),
    ("run: svm\ndemo: {n_trials: 3}\n", "demo.n_trials: unknown key for a run experiment"),
    ("kind: featuremaps\nthreshold: high\n", "threshold: 'high': expected a number"),
    ("kind: painting\n", "kind='painting'"),
    ("run: svm\nkind: describe\n", "name exactly one of study:, run:, kind:"),
]


@pytest.mark.parametrize("body, fragment", BAD_FILES, ids=[b.split("\n")[0] for b, _ in BAD_FILES])
def test_bad_experiment_files_are_refused_naming_the_file_and_key(body, fragment, tmp_path, store):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    assert_clear_error(invoke("run", str(path), "--demo"), str(path), fragment)
    assert not logged_runs()  # refused before any run


def test_a_bad_override_is_refused_in_a_new_process(tmp_path):
    result = run_cli("run", str(REPO / "experiments" / "q8_svm_relu7.yaml"), "--demo", "--lr", "0.1")
    assert_clear_error(result, "q8_svm_relu7.yaml", "--lr: unknown run parameter for head svm")


def test_first_conv_maps_are_64_maps_per_image_and_thresholded(flat_scenes):
    images = sorted(flat_scenes.glob("*/*_0[01].*"))[:2]
    result = first_conv_maps(images, weights="random", image_size=32, threshold=0.5)
    assert result.maps.shape == (2, 64, 32, 32) and result.inputs.shape == (2, 32, 32, 3)
    assert (result.maps >= 0).all()  # after the ReLU
    np.testing.assert_array_equal(result.thresholded, result.maps > 0.5)
    assert result.active_fraction().shape == (2, 64)


# ---------------------------------------------------------------------------------------------
# The report, from the same demo runs: it holds each table, labels demo figures as such, and names
# every missing run with the command that would produce it.
# ---------------------------------------------------------------------------------------------

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
    assert_question_sections(markdown)
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
    assert "report/report.md" in logged and "report/figures" in logged and "report/studies.csv" in logged
    # Every study in the store, side by side.
    studies = markdown.split("## Studies in the tracking store", 1)[1]
    assert studies.count("| DEMO |") == 4 and (out / "studies.csv").is_file()
    assert_backbones_section(section_of(markdown, "Backbones"))


def assert_question_sections(markdown: str) -> None:
    """The study's questions, each with its own table or figures."""
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


def assert_backbones_section(backbones: str) -> None:
    """Beyond VGG: one row per backbone, what it costs and gives, beside Kornblith et al."""
    assert "Kornblith, Shlens and Le" in backbones and "89.15 % test" in backbones
    header = next(line for line in backbones.splitlines() if line.startswith("| backbone | family |"))
    for column in ("parameters", "features (width)", "ImageNet top-1", "extraction images/s", "val acc", "test acc"):
        assert column in header, column
    for arch, family, width in (("vgg16", "vgg", "relu7 (4096)"), ("resnet50", "resnet", "pool (2048)"),
                                ("convnext_tiny", "convnext", "pool (768)")):
        row = next(line for line in backbones.splitlines() if line.startswith(f"| {arch} | {family} |"))
        assert width in row and row.count("%") >= 3, row  # ImageNet top-1, val and test accuracy


def test_studies_lists_every_study_side_by_side_and_compares_two(tmp_path_factory, tmp_path, monkeypatch):
    """`scenesweep studies`: one row per study (trials by state, best value and trial, test
    accuracy, registered version, wall time, hardware) read from MLflow; `--compare A B` draws
    both best-so-far curves in one PNG."""
    runs = demo_runs(tmp_path_factory)
    runs.use(monkeypatch)
    client = MlflowClient()
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'parent'")
    names = sorted(p.data.tags["study"] for p in parents)
    assert len(names) == 4
    result = CliRunner().invoke(main, ["studies", "--out", str(tmp_path / "side"), "--compare", *names[:2]])
    assert result.exit_code == 0, result.output[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["study", "experiment", "setting", "objective", "complete"]
    for parent in parents:
        row = next(line for line in lines if line.startswith(parent.data.tags["study"] + " "))
        complete = int(parent.data.metrics["trials/complete"])
        assert f" {complete} " in row and f"#{parent.data.tags['best_trial']}" in row
        assert f"{parent.data.metrics['test/acc']:.4f}" in row and "DEMO" in row
    table = list(csv.DictReader((tmp_path / "side" / "studies.csv").open()))
    assert sorted(r["study"] for r in table) == names and all(float(r["wall_s"]) > 0 for r in table)
    pngs = list((tmp_path / "side").glob("compare-*-vs-*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    unknown = CliRunner().invoke(main, ["studies", "--compare", names[0], "nope"])
    assert unknown.exit_code == 2 and "--compare nope: no such study" in unknown.stderr


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


def test_the_studies_table_gives_wall_times_in_one_unit():
    """'111 s' beside '7.0 min' read badly: minutes for the whole column, the header says so."""
    from scenesweep.report.studies import COLUMNS, wall_text

    assert "wall time (min)" in COLUMNS
    assert [wall_text(s) for s in (42, 111, 420, 11_580)] == ["0.7", "1.9", "7.0", "193.0"]
