"""What MLflow and Optuna users look for in a study (issue 13), against real stores.

One `sweep_svm` study (4 trials, 3 classes, 32 px) runs once for the module through
`mlflow run . -e sweep_svm --experiment-name svm` with the MLproject's empty defaults for
everything but the data, as a user types it. Its stores are then read as the MLflow UI,
optuna-dashboard and the report read them: the datasets of the parent and of every trial, the
parent's live chart (step = trial number), the best trial's per-class results, the dashboard
notes that link MLflow, where the artifacts landed, and the report's setting line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from optuna_dashboard import get_note
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from scenesweep.cli.main import main
from scenesweep.report.finding import resolved_params
from scenesweep.tracking import provenance, sink

from helpers import CLASSES, REPO
from test_registry import write_flat_scenes

pytestmark = pytest.mark.slow
EXPERIMENT = "svm"


def mlflow_run(entry: str, params: dict, experiment: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """``mlflow run . -e ENTRY --env-manager local --experiment-name EXPERIMENT -P k=v ...``."""
    command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env},
                          timeout=timeout)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study_tracking")
    store = folder / "store"
    store.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "SCENESWEEP_OFFLINE": "1",
           "TORCH_HOME": str(folder / "torch_home"), "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
           "OPTUNA_STORAGE": f"sqlite:///{store / 'optuna.db'}", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    scenes = write_flat_scenes(folder / "scenes")
    result = mlflow_run("sweep_svm", {"data": scenes, "train_per_class": 10, "n_trials": 4,
                                      "cache_dir": folder / "cache"}, EXPERIMENT, env)
    assert result.returncode == 0, result.stderr[-4000:]
    return SimpleNamespace(folder=folder, store=store, env=env, scenes=scenes, cache=folder / "cache")


@pytest.fixture
def study_store(swept, monkeypatch):
    """This test on the module's stores (the autouse fixture gave it empty ones)."""
    for key, value in swept.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(swept.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    study = optuna.load_study(study_name="sweep_svm", storage=swept.env["OPTUNA_STORAGE"])
    return SimpleNamespace(**vars(swept), client=client, experiment=experiment, parent=parent, children=children,
                           study=study)


def contexts(run) -> dict[str, object]:
    """context (training / validation / test) -> the logged dataset."""
    found = {}
    for dataset_input in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in dataset_input.tags}
        found[tags[MLFLOW_DATASET_CONTEXT]] = dataset_input.dataset
    return found


def test_sweep_svm_through_mlflow_run_nests_one_run_per_trial(study_store):
    """`mlflow run . -e sweep_svm`: one parent (the project's run), one nested run per trial."""
    s = study_store
    parent, children, study = s.parent, s.children, s.study
    assert len(children) == 4 and parent.info.status == "FINISHED" and len(study.trials) == 4
    for child in children:
        assert child.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.info.status == "FINISHED"
        number = int(child.data.tags["trial_number"])
        assert child.data.tags["study"] == "sweep_svm"
        assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
        assert float(child.data.params["C"]) == pytest.approx(study.trials[number].params["C"])
        assert child.info.run_name.startswith(f"sweep_svm #{number} C=")
        # Selection read validation only; the test split was scored once, for the best trial's
        # model (its record's metrics, logged in its run).
        is_best = child.info.run_id == parent.data.tags["best_run_id"]
        assert "val/acc" in child.data.metrics and ("test/acc" in child.data.metrics) == is_best
    # The convolutions ran once for the whole study.
    assert sorted(c.data.tags["conv_cache"] for c in children) == ["hit", "hit", "hit", "miss"]
    best = max(study.trials, key=lambda t: (t.value, -t.number))  # the first of equal values
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best.value)
    assert parent.data.params["best.C"] == str(best.params["C"])
    assert "test/acc" in parent.data.metrics
    best_child = [c for c in children if c.data.tags.get("best_trial") == "true"]
    assert [c.info.run_id for c in best_child] == [parent.data.tags["best_run_id"]]
    artifacts = {a.path for a in s.client.list_artifacts(parent.info.run_id, "plots")}
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "slice", "contour"):
        assert f"plots/optuna_{plot}.png" in artifacts, artifacts
    assert "trials.csv" in {a.path for a in s.client.list_artifacts(parent.info.run_id)}


def test_the_parent_and_every_trial_log_their_splits_as_datasets(study_store):
    s = study_store
    fingerprint = s.children[0].data.params["dataset_fingerprint"]
    parent = contexts(s.parent)
    assert set(parent) == {"training", "validation", "test"}
    for logged in parent.values():
        assert logged.name == "scenes"  # the data folder's name
        assert logged.digest.startswith(fingerprint[:8] + "-")
        assert logged.source_type == "local" and json.loads(logged.source) == {"uri": str(s.scenes)}
    profile = {c: json.loads(d.profile) for c, d in parent.items()}
    assert {c: p["images"] for c, p in profile.items()} == {"training": 24, "validation": 6, "test": 12}
    assert {p["dataset_fingerprint"] for p in profile.values()} == {fingerprint}
    assert len({d.digest for d in parent.values()}) == 3  # three splits, three digests
    assert len(s.children) == 4
    for child in s.children:  # the study's data is fixed: every trial read the parent's splits
        assert {c: d.digest for c, d in contexts(child).items()} == {c: d.digest for c, d in parent.items()}


def test_the_parent_charts_the_study_as_it_runs(study_store):
    """trial/val/acc, best/val/acc and the counts at step = trial number (runs.sweep.log_progress);
    the final best has the live series' name: one chart, its last point the study's result."""
    s = study_store
    trials = sorted(s.study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4

    def history(name):
        return sorted((m.step, m.value) for m in s.client.get_metric_history(s.parent.info.run_id, name))

    assert history("trial/val/acc") == [(t.number, pytest.approx(t.value)) for t in trials]
    running_best = np.maximum.accumulate([t.value for t in trials])
    assert history("best/val/acc") == [(t.number, pytest.approx(b)) for t, b in zip(trials, running_best)]
    assert s.parent.data.metrics["best/val/acc"] == pytest.approx(s.study.best_value)
    assert not {"best/val_acc", "trial/val_acc"} & set(s.parent.data.metrics)
    # One point per trial (the summary's last point repeats the last step with the same value).
    assert sorted(set(history("trials/complete"))) == [(n, n + 1) for n in range(4)]
    assert {v for _, v in history("trials/fail")} == {0} and {v for _, v in history("trials/pruned")} == {0}
    assert "trials/failed" not in s.parent.data.metrics


def test_the_best_trial_logs_per_class_results(study_store, tmp_path):
    s = study_store
    metrics = s.parent.data.metrics
    assert 0 <= metrics["test/f1_macro"] <= 1 and 0 <= metrics["test/acc_balanced"] <= 1
    table = s.client.load_table(s.experiment.experiment_id, "per_class.json", run_ids=[s.parent.info.run_id])
    assert list(table["class"]) == list(CLASSES)
    assert set(table["trial"]) == {int(s.parent.data.tags["best_trial"])}
    assert table["support"].sum() == 12 and table["predicted"].sum() == 12
    assert metrics["test/acc_balanced"] == pytest.approx(table["recall"].mean())
    assert metrics["test/f1_macro"] == pytest.approx(table["f1"].mean())
    # The confusion matrix gives the same accuracy as test/acc.
    hits = (table["recall"] * table["support"]).sum()
    assert hits / 12 == pytest.approx(metrics["test/acc"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_per_class_results_match_scikit_learn():
    rng = np.random.default_rng(0)
    for classes, n in ((3, 40), (5, 17), (4, 3)):  # the last: classes without test images or predictions
        y_true, y_pred = rng.integers(0, classes, n), rng.integers(0, classes, n)
        confusion = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(confusion, (y_true, y_pred), 1)
        table, metrics = sink.per_class_results(confusion, tuple(f"c{i}" for i in range(classes)))
        labels = np.arange(classes)
        precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                         zero_division=0)
        np.testing.assert_allclose(table["precision"], precision)
        np.testing.assert_allclose(table["recall"], recall)
        np.testing.assert_allclose(table["f1"], f1)
        assert list(table["support"]) == list(support)
        assert metrics["test/f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        assert metrics["test/acc_balanced"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_dashboard_notes_link_each_trial_and_the_study_to_mlflow(study_store):
    s = study_store
    experiment_id = s.experiment.experiment_id
    for trial in s.study.trials:
        note = get_note(optuna.Trial(s.study, trial._trial_id))
        run_id = trial.user_attrs["mlflow_run_id"]
        assert f"(http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)" in note
        assert "scenesweep ui" in note and f"run id `{run_id}`" in note
        assert f"#/experiments/{experiment_id}/runs/{s.parent.info.run_id}" in note
    note = get_note(s.study)
    assert f"#/experiments/{experiment_id}/runs/{s.parent.info.run_id}" in note
    version = s.client.get_registered_model("scene-classifier").latest_versions or \
        s.client.search_model_versions("name='scene-classifier'")
    assert version and f"#/models/scene-classifier/versions/{version[0].version}" in note
    assert f"Best trial #{s.parent.data.tags['best_trial']}" in note


def test_ui_links_point_at_a_tracking_server_when_there_is_one(monkeypatch):
    path = provenance.run_ui_path("3", "abc")
    assert provenance.ui_link("run", path, "http://mlflow.lab:5000/") == "[run](http://mlflow.lab:5000/#/experiments/3/runs/abc?workflowType=machine_learning)"
    assert provenance.ui_link("run", path, "https://user:secret@host").startswith("[run](https://user:***@host/#/")
    assert provenance.ui_hint("http://mlflow.lab:5000") == ""
    sqlite = "sqlite:////data/mlruns/mlflow.db"
    assert provenance.ui_link("run", path, sqlite) == "[run](http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning)"
    assert "`scenesweep ui`, or `mlflow ui --backend-store-uri sqlite:////data/mlruns/mlflow.db`" in \
        provenance.ui_hint(sqlite)
    assert provenance.model_version_ui_path("scene classifier", 2) == "#/models/scene%20classifier/versions/2"
    # A UI elsewhere than scenesweep ui's default address (another --port, another machine).
    monkeypatch.setenv("SCENESWEEP_UI_URL", "http://lab-box:8080/")
    assert provenance.ui_link("run", path, sqlite) == "[run](http://lab-box:8080/#/experiments/3/runs/abc?workflowType=machine_learning)"
    assert "at http://lab-box:8080:" in provenance.ui_hint(sqlite)


def test_artifacts_land_under_the_stores_artifacts_folder(study_store):
    """A sweep through `mlflow run` (its experiment created by MLflow) and an experiment run
    (created by scenesweep) both keep their artifacts in <store>/artifacts, nowhere else."""
    s = study_store
    root = (s.store / "artifacts").resolve().as_uri()
    assert s.experiment.artifact_location.startswith(root + "/")
    for run in (s.parent, *s.children):
        assert run.info.artifact_uri.startswith(root + "/")
    files = Path(url2pathname(urlparse(s.parent.info.artifact_uri).path))
    assert (files / "trials.csv").is_file() and (files / "study" / "svm_c.yaml").is_file()
    result = CliRunner().invoke(main, ["run", str(REPO / "experiments" / "q1_parameter_count.yaml"), "--demo"])
    assert result.exit_code == 0, result.output[-3000:]
    [q1] = s.client.search_runs([e.experiment_id for e in s.client.search_experiments()],
                                filter_string="tags.`scenesweep.experiment` = 'q1_parameter_count'")
    assert q1.info.artifact_uri.startswith(root + "/")
    assert sorted(p.name for p in s.store.iterdir() if p.is_dir()) == ["artifacts"]  # no mlruns/<id> beside it


def test_the_report_shows_the_resolved_setting_of_an_mlflow_run_sweep(study_store, tmp_path):
    s = study_store
    params = s.parent.data.params
    # As typed (MLflow logs the MLproject's empty default as two quotes), and as run.
    assert params["weights"] == "''" and params["resolved.weights"] == "random"
    assert params["image_size"] == "''" and params["resolved.image_size"] == "32"
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--out", str(out), "--no-log"])
    assert result.exit_code == 0, result.output[-3000:]
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Q8/Q10:", 1)[1].split("\n## ", 1)[0]
    setting = next(line for line in section.splitlines() if line.startswith("- Setting:"))
    assert f"data={s.scenes}" in setting and "weights=random" in setting and "image_size=32" in setting
    assert "train_per_class=10" in setting and "=''" not in setting and "=," not in setting
    assert "**DEMO**" in setting


def test_a_parent_logged_before_its_resolved_setting_reads_as_the_study_file_and_defaults():
    """Parents of an older scenesweep logged only fixed.<name> beside mlflow run's '' values."""
    run = SimpleNamespace(data=SimpleNamespace(params={"data": "''", "weights": "''", "image_size": "''",
                                                       "batch_size": "", "fixed.data": "/data/15-Scene"}))
    params = resolved_params(run)
    assert (params["data"], params["weights"], params["image_size"], params["batch_size"]) == \
        ("/data/15-Scene", "random", "32", "32")


def test_off_cuda_trials_log_no_gpu_figures_and_the_gpu_extra_exists(study_store):
    s = study_store
    with provenance.gpu_usage("cpu") as usage:
        pass
    assert usage == {}
    for run in (s.parent, *s.children):
        assert not [k for k in run.data.metrics if k.startswith("gpu/") or k.startswith("system/gpu")]
    assert any(k.startswith("system/") for k in s.parent.data.metrics)  # CPU system metrics are there
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("nvidia-ml-py") for req in extras["gpu"])
