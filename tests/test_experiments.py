"""Experiment files (experiments/*.yaml): each loads, validates and runs at demo size against a
temporary store; bad files fail before anything runs, naming the file and the key.

Tests loop over the experiments/ folder, so a new file is tested for free.
"""
import json
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
from scenesweep.specs.experiments import DEMO_SETTING, REAL_SETTING, TAG_EXPERIMENT, load_experiment
from scenesweep.specs.plans import plan
from scenesweep.compute.featuremaps import first_conv_maps

from conftest import REPO, run_cli
from experiment_runs import EXPERIMENT_FILES, demo_runs

EXPECTED = {"q1_parameter_count", "q3_imagenet_predictions", "q4_first_conv_maps", "q8_svm_relu7",
            "q12_1_fc_width", "q12_2_head_pool5", "q12_3_pooling"}


def invoke(*args: str) -> subprocess.CompletedProcess:
    """The CLI in-process; the result looks like a finished subprocess."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in message[0], (fragment, message[0])


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
        for name in ("train/acc", "val/acc", "test/acc", "time/extract_batch_mean_s"):
            assert name in metrics, name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert sorted(steps) == list(range(1, experiment.demo["epochs"] + 1))
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
