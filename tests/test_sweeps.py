"""Optuna studies tracked in MLflow, against temporary stores: the README's promises for sweeps."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from scenesweep.config import run_parameters
from scenesweep.search import default_storage
from scenesweep.studies import load_study

from conftest import REPO, run_cli, run_mlflow_project

pytestmark = pytest.mark.slow
STUDY_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


def all_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def parents_and_children():
    runs = all_runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    return parents, children


def load(study_name="sweep_svm"):
    return optuna.load_study(study_name=study_name, storage=default_storage())


def sweep(study_file, *args, **kwargs):
    return run_cli("sweep", str(study_file), "--no-progress", *args, **kwargs)


def write_study(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_space_key_is_a_parameter_of_what_the_study_tunes(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw["space"]) <= set(run_parameters(raw["tunes"]))
    spec = load_study(path)
    for params in spec.enqueue:
        spec.trial_config(params)  # the study's own points are valid configurations


def test_sweep_svm_through_mlflow_run_nests_one_run_per_trial(flat_scenes, tmp_path):
    result = run_mlflow_project("sweep_svm", {"data": flat_scenes, "train_per_class": 10, "n_trials": 4,
                                              "cache_dir": tmp_path / "cache"})
    assert result.returncode == 0, result.stderr[-4000:]
    parents, children = parents_and_children()
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    study = load("sweep_svm")
    assert len(study.trials) == 4
    for child in children:
        assert child.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.info.status == "FINISHED"
        number = int(child.data.tags["trial_number"])
        assert child.data.tags["study"] == "sweep_svm"
        assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
        assert float(child.data.params["C"]) == pytest.approx(study.trials[number].params["C"])
        assert child.info.run_name.startswith(f"sweep_svm #{number} C=")
        assert "val/acc" in child.data.metrics and "test/acc" not in child.data.metrics
    # The convolutions ran once for the whole study.
    assert sorted(c.data.tags["conv_cache"] for c in children) == ["hit", "hit", "hit", "miss"]
    best = study.best_trial
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best.value)
    assert parent.data.params["best.C"] == str(best.params["C"])
    assert "test/acc" in parent.data.metrics
    best_child = [c for c in children if c.data.tags.get("best_trial") == "true"]
    assert [c.info.run_id for c in best_child] == [parent.data.tags["best_run_id"]]
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "slice", "contour"):
        assert f"plots/optuna_{plot}.png" in artifacts, artifacts
    assert "trials.csv" in {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}


def test_sweep_fc_computes_pool5_once_and_fc_layers_per_width(flat_scenes, tmp_path):
    result = sweep(REPO / "sweeps" / "fc_width.yaml", "--n_trials", "3", "--data", str(flat_scenes),
                   "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-4000:]
    _, children = parents_and_children()
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    # The study's own points ran first.
    assert [by_number[i].data.params["fc_width"] for i in range(3)] == ["8196", "16384", "4096"]
    assert by_number[0].data.params["C"] == "0.012" and by_number[1].data.params["C"] == "0.003"
    assert [by_number[i].data.tags["conv_cache"] for i in range(3)] == ["miss", "hit", "hit"]
    assert [by_number[i].data.tags["cache"] for i in range(3)] == ["miss", "miss", "miss"]


def test_sweep_pooling_extracts_once_per_pooling_and_logs_epochs(flat_scenes, tmp_path):
    result = sweep(REPO / "sweeps" / "pooling.yaml", "--n_trials", "4", "--epochs", "3", "--data", str(flat_scenes),
                   "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-4000:]
    _, children = parents_and_children()
    assert sorted(c.data.params["pooling"] for c in children) == ["avg", "lp1", "lp2", "max"]
    assert {c.data.tags["conv_cache"] for c in children} == {"miss"}
    client = MlflowClient()
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")]
        assert sorted(steps) == [1, 2, 3]


def test_a_pruned_trial_ends_killed_with_a_pruned_tag(flat_scenes, tmp_path):
    study = write_study(tmp_path, f"""
        study: prune_me
        experiment: pooling
        tunes: mlp
        fixed: {{data: "{flat_scenes}", train_per_class: 10, epochs: 4, hidden: "64", dropout: 0.0,
                batch_size: 4, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          lr: {{type: float, low: 1.0e-9, high: 1.0e-1, log: true}}
        pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 0}}
        n_trials: 2
        enqueue:
          - {{lr: 0.001}}
          - {{lr: 1.0e-9}}
        register: ""
        """)
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("prune_me").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    _, children = parents_and_children()
    pruned = [c for c in children if c.data.tags["trial_number"] == "1"][0]
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"].startswith("pruned at epoch")


def test_a_failing_trial_is_failed_and_the_study_goes_on(flat_scenes, tmp_path):
    study = write_study(tmp_path, f"""
        study: survive
        experiment: svm
        tunes: svm
        fixed: {{data: "{flat_scenes}", train_per_class: 10, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          weights: {{type: categorical, choices: [random, "{tmp_path / 'missing.pt'}"]}}
        n_trials: 2
        enqueue:
          - {{weights: "{tmp_path / 'missing.pt'}"}}
          - {{weights: random}}
        register: ""
        """)
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [t.state for t in load("survive").trials] == [TrialState.FAIL, TrialState.COMPLETE]
    parents, children = parents_and_children()
    failed = [c for c in children if c.data.tags["trial_number"] == "0"][0]
    assert failed.info.status == "FAILED" and "missing.pt" in failed.data.tags["error"]
    assert parents[0].data.tags["best_trial"] == "1"


def test_running_again_resumes_up_to_n_trials_in_total(flat_scenes, tmp_path):
    args = ("--data", str(flat_scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"),
            "--no-register")
    first = sweep(REPO / "sweeps" / "svm_c.yaml", "--n_trials", "2", *args)
    assert first.returncode == 0, first.stderr[-4000:]
    second = sweep(REPO / "sweeps" / "svm_c.yaml", "--n_trials", "3", *args)
    assert second.returncode == 0, second.stderr[-4000:]
    trials = load("sweep_svm").trials
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    parents, children = parents_and_children()
    assert len(parents) == 2 and len(children) == 3
    per_parent = sorted(sum(c.data.tags[MLFLOW_PARENT_RUN_ID] == p.info.run_id for c in children) for p in parents)
    assert per_parent == [1, 2]


def test_a_killed_trial_is_failed_retried_and_leaves_no_run_running(flat_scenes, tmp_path):
    study = write_study(tmp_path, f"""
        study: killed
        experiment: pooling
        tunes: mlp
        fixed: {{data: "{flat_scenes}", train_per_class: 10, hidden: "64", epochs: 300,
                cache_dir: "{tmp_path / 'cache'}"}}
        space:
          lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
        n_trials: 1
        register: ""
        """)
    worker = subprocess.Popen([sys.executable, "-m", "scenesweep", "sweep", str(study), "--heartbeat", "1",
                               "--no-progress"], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                trials = load("killed").trials
            except KeyError:
                trials = []
            if trials and trials[0].state == TrialState.RUNNING and "mlflow_run_id" in trials[0].user_attrs:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the trial never started")
        time.sleep(1.5)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait(30)
    killed_params = load("killed").trials[0].params
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    result = sweep(study, "--heartbeat", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("killed").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == killed_params and trials[1].system_attrs["failed_trial"] == 0
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed_run = [r for r in runs if r.info.run_id == trials[0].user_attrs["mlflow_run_id"]][0]
    assert killed_run.info.status == "FAILED" and "heartbeat" in killed_run.data.tags["error"]
    assert sum(r.info.status == "FAILED" and r.data.tags.get("sweep") == "parent" for r in runs) == 1


def test_two_workers_share_one_sqlite_study(flat_scenes, tmp_path):
    args = [sys.executable, "-m", "scenesweep", "sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--n_trials", "8",
            "--data", str(flat_scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"),
            "--no-register", "--no-progress"]
    workers = [subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    trials = load("sweep_svm").trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) >= 8
    assert all(t.state == TrialState.COMPLETE for t in trials)
    parents, children = parents_and_children()
    assert len(parents) == 2 and len(children) == len(trials)
    for child in children:
        parent = [p for p in parents if p.info.run_id == child.data.tags[MLFLOW_PARENT_RUN_ID]][0]
        assert parent.data.tags["pid"] == child.data.tags["pid"]  # under its own process's parent
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {c.info.run_id for c in children}


@pytest.mark.parametrize("body, fragment", [
    ("study: s\ntunes: svm\nspace: {C: {type: float, low: 0.1, high: 1}}\nn_trials: 1\nbogus: 1\n", "unknown key(s) bogus"),
    ("study: s\ntunes: svm\nspace: {lr: {type: float, low: 0.1, high: 1}}\nn_trials: 1\n", "space key 'lr' is not a parameter of 'svm'"),
    ("study: s\ntunes: svm\nspace: {C: {type: float, low: 0, high: 1}}\nn_trials: 1\n", "space.C: C=0: expected a value > 0"),
    ("study: s\ntunes: svm\nspace: {fc_width: {type: int, low: 512, high: 4096}}\nn_trials: 1\n", "space.fc_width: fc_width=512"),
    ("study: s\ntunes: mlp\nspace: {pooling: {type: categorical, choices: [max, median]}}\nn_trials: 1\n", "pooling='median'"),
    ("study: s\ntunes: svm\nspace: {layer: {type: categorical, choices: [fc9]}}\nn_trials: 1\n", "layer='fc9'"),
    ("study: s\ntunes: svm\nspace: {C: {type: float, low: 0.1, high: 1}}\n", "set n_trials and/or timeout"),
    ("study: s\ntunes: svm\nspace: {C: {type: float, low: 0.1, high: 1}}\nn_trials: 1\nobjective: {metric: test/acc}\n", "selection never looks at the test split"),
])
def test_bad_study_files_are_refused_before_any_trial(body, fragment, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    result = sweep(path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and fragment in result.stderr, result.stderr
    assert not all_runs()


def test_a_study_does_not_resume_under_another_setting(flat_scenes, tmp_path):
    args = ("--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"), "--no-register", "--n_trials", "1")
    first = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), *args)
    assert first.returncode == 0, first.stderr[-4000:]
    other = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), "--image_size", "48", *args)
    assert other.returncode == 2 and "image_size: 32 -> 48" in other.stderr and "--study_name" in other.stderr
    renamed = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), "--image_size", "48",
                    "--study_name", "sweep_svm_48px", *args)
    assert renamed.returncode == 0, renamed.stderr[-4000:]
