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

from scenesweep.core.config import run_parameters
from scenesweep.search.storage import default_storage
from scenesweep.specs.studies import load_study

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
          lr: {{type: float, low: 1.0e-9, high: 2.0e-9, log: true}}
        pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 0}}
        n_trials: 2
        enqueue:
          - {{lr: 0.001}}
        register: ""
        """)
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("prune_me").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    _, children = parents_and_children()
    pruned = [c for c in children if c.data.tags["trial_number"] == "1"][0]
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"].startswith("pruned at epoch")


def test_the_studys_own_settings_run_in_full_and_tuning_trials_as_the_file_declares(flat_scenes, tmp_path):
    """Enqueued settings (the reference study's points) are never pruned and keep the fixed batch
    size; tuning trials run at the file's tuning batch size and are pruned."""
    study = write_study(tmp_path, f"""
        study: own_and_tuning
        experiment: pooling
        tunes: mlp
        fixed: {{data: "{flat_scenes}", train_per_class: 10, epochs: 4, hidden: "64", dropout: 0.0,
                batch_size: 8, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          lr: {{type: float, low: 1.0e-9, high: 2.0e-9, log: true}}
        pruner: {{name: median, n_startup_trials: 2, n_warmup_steps: 0}}
        tuning: {{batch_size: 4}}
        n_trials: 4
        enqueue:
          - {{lr: 0.001}}
          - {{lr: 1.0e-9}}
        register: ""
        """)
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("own_and_tuning").trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.COMPLETE]  # the bad one too
    assert TrialState.PRUNED in [t.state for t in trials[2:]]
    _, children = parents_and_children()
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    assert [by_number[n].data.tags["trial_kind"] for n in range(4)] == ["own setting"] * 2 + ["tuning"] * 2
    assert [by_number[n].data.params["batch_size"] for n in range(4)] == ["8", "8", "4", "4"]


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
    # The resume drew new parameters: it did not replay the first run's start-up points.
    assert trials[2].params != trials[1].params
    # One study, one parent run: the resume attached its trial to it.
    parents, children = parents_and_children()
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags[MLFLOW_PARENT_RUN_ID] for c in children} == {parents[0].info.run_id}


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
    # The killed worker's parent is the study's: the resume attached to it and finished it.
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def start_workers(count, study, *args, heartbeat="30"):
    command = [sys.executable, "-m", "scenesweep", "sweep", str(study), "--no-progress", "--heartbeat", heartbeat, *args]
    return [subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(count)]


def test_three_workers_share_one_study_exactly(flat_scenes, tmp_path):
    """Three workers at once: exactly n_trials finish, no two draw the same parameters, one
    parent run holds every trial (each tagged with the worker that ran it), one model version."""
    study = write_study(tmp_path, f"""
        study: shared
        experiment: svm
        tunes: svm
        fixed: {{data: "{flat_scenes}", train_per_class: 10, layer: pool5, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          C: {{type: float, low: 1.0e-3, high: 1.0e2, log: true}}
        sampler: {{name: tpe, seed: 0}}
        n_trials: 9
        register: scene-classifier
        """)
    workers = start_workers(3, study)
    outputs = [w.communicate(timeout=900) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    trials = load("shared").trials
    assert len(trials) == 9 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["C"] for t in trials}) == 9  # no repeated start-up points
    parents, children = parents_and_children()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 9 and {c.data.tags[MLFLOW_PARENT_RUN_ID] for c in children} == {parents[0].info.run_id}
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    assert set(by_run) == {c.info.run_id for c in children}
    for child in children:
        worker = by_run[child.info.run_id].user_attrs["worker"]
        assert child.data.tags["pid"] == str(worker["pid"]) and child.data.tags["host"] == worker["host"]
        assert child.info.status == "FINISHED"
    assert {c.data.tags["pid"] for c in children} <= {str(w.pid) for w in workers}
    # One worker summarised: one best trial, one registered version.
    assert sum("best trial #" in out for out, _ in outputs) == 1
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='scene-classifier'")] == ["1"]
    assert parents[0].data.tags["best_trial"] == str(load("shared").best_trial.number)


def test_a_seeded_study_is_reproducible_with_one_worker(flat_scenes, tmp_path, monkeypatch):
    study = write_study(tmp_path, f"""
        study: seeded
        tunes: svm
        fixed: {{data: "{flat_scenes}", train_per_class: 10, layer: pool5, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          C: {{type: float, low: 1.0e-3, high: 1.0e2, log: true}}
        sampler: {{name: random, seed: 7}}
        n_trials: 3
        register: ""
        """)
    draws = []
    for name in ("first", "second"):
        result = sweep(study, "--storage", f"sqlite:///{tmp_path / (name + '.db')}")
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = optuna.load_study(study_name="seeded", storage=f"sqlite:///{tmp_path / (name + '.db')}")
        draws.append([t.params["C"] for t in loaded.trials])
    assert draws[0] == draws[1] and len(set(draws[0])) == 3


def test_a_study_name_given_on_the_command_line_tags_every_trial(flat_scenes, tmp_path):
    result = sweep(REPO / "sweeps" / "svm_c.yaml", "--n_trials", "2", "--study_name", "my_study",
                   "--data", str(flat_scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"),
                   "--no-register")
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = parents_and_children()
    assert {c.data.tags["study"] for c in children} == {"my_study"}
    assert {c.data.tags["optuna.storage_study"] for c in children} == {"my_study"}
    assert parents[0].data.tags["study"] == "my_study"


def test_a_study_where_every_trial_fails_exits_non_zero(flat_scenes, tmp_path):
    study = write_study(tmp_path, f"""
        study: doomed
        tunes: svm
        fixed: {{data: "{flat_scenes}", train_per_class: 10, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          weights: {{type: categorical, choices: ["{tmp_path / 'a.pt'}", "{tmp_path / 'b.pt'}"]}}
        n_trials: 2
        register: ""
        """)
    result = sweep(study)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no trial of study 'doomed' completed" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    parents, children = parents_and_children()
    assert parents[0].info.status == "FAILED" and "no trial" in parents[0].data.tags["error"]
    assert {c.info.status for c in children} == {"FAILED"}
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


def kill_during_trial(study, number, *args, heartbeat="1"):
    """Start a worker, SIGKILL it while trial ``number`` runs; returns that trial's params."""
    worker = subprocess.Popen([sys.executable, "-m", "scenesweep", "sweep", str(study), "--heartbeat", heartbeat,
                               "--no-progress", *args], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = yaml.safe_load(study.read_text())["study"]
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                trials = load(name).trials
            except KeyError:
                trials = []
            if len(trials) > number and trials[number].state == TrialState.RUNNING \
                    and "mlflow_run_id" in trials[number].user_attrs:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"trial {number} never started")
        time.sleep(1.0)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait(30)
    return load(name).trials[number].params


def long_mlp_study(tmp_path, flat_scenes, name, n_trials):
    return write_study(tmp_path, f"""
        study: {name}
        experiment: pooling
        tunes: mlp
        fixed: {{data: "{flat_scenes}", train_per_class: 10, hidden: "64", epochs: 300,
                cache_dir: "{tmp_path / 'cache'}"}}
        space:
          lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
        n_trials: {n_trials}
        register: ""
        """, name=f"{name}.yaml")


def test_a_trial_killed_in_the_last_slot_is_retried_at_once_on_this_host(flat_scenes, tmp_path):
    """The study already has n_trials (the killed one included) and the heartbeat is fresh: the
    resume fails it at once (its pid is gone), retries its parameters, and leaves nothing RUNNING."""
    study = long_mlp_study(tmp_path, flat_scenes, "last_slot", 1)
    # A 300 s heartbeat: waiting for it to go stale (600 s) would outlast sweep()'s timeout.
    killed_params = kill_during_trial(study, 0, heartbeat="300")
    result = sweep(study, "--heartbeat", "300")
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("last_slot").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == killed_params
    assert not [r.info.run_name for r in all_runs() if r.info.status == "RUNNING"]


def test_a_dead_worker_elsewhere_is_found_by_its_heartbeat(flat_scenes, tmp_path):
    """A trial whose worker ran on another machine (its pid cannot be checked here) is failed
    once its heartbeat goes stale, retried, and its run ends FAILED: the sweep waits it out."""
    study = long_mlp_study(tmp_path, flat_scenes, "elsewhere", 1)
    # Heartbeats every 10 s: the trial is not stale yet when the resume starts, so it waits.
    kill_during_trial(study, 0, heartbeat="10")
    storage = optuna.storages.RDBStorage(default_storage())
    frozen = load("elsewhere").trials[0]
    storage.set_trial_user_attr(frozen._trial_id, "worker", {**frozen.user_attrs["worker"], "host": "another-machine"})
    result = sweep(study, "--heartbeat", "10")
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("elsewhere").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    runs = {r.info.run_id: r for r in all_runs()}
    killed = runs[trials[0].user_attrs["mlflow_run_id"]]
    assert killed.info.status == "FAILED" and "another-machine" in killed.data.tags["error"]
    assert "heartbeat went stale" in killed.data.tags["error"]
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def test_two_mlflow_runs_at_once_on_a_fresh_store(flat_scenes, tmp_path, monkeypatch):
    """Two `mlflow run -e sweep_svm` started together on a new SQLite store both come up (the
    schema is created once), share the study, and write their artifacts beside that store."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh / 'mlflow.db'}")
    before = set((REPO / "mlruns").iterdir()) if (REPO / "mlruns").is_dir() else set()
    params = {"data": flat_scenes, "train_per_class": 10, "n_trials": 4, "cache_dir": tmp_path / "cache"}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_bin, "run", ".", "-e", "sweep_svm", "--env-manager", "local", "--experiment-name", "svm"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    runs = [subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=900) for r in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-4000:]
    study = optuna.load_study(study_name="sweep_svm", storage=f"sqlite:///{fresh / 'optuna.db'}")
    assert len(study.trials) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{fresh / 'mlflow.db'}")
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    parents = [r for r in everything if r.data.tags.get("sweep") == "parent"]
    workers = [r for r in everything if r.data.tags.get("sweep") == "worker"]
    assert {r.info.status for r in everything} == {"FINISHED"}
    assert len(parents) == 1 and len(workers) == 1
    assert workers[0].data.tags["study_parent_run_id"] == parents[0].info.run_id
    for run in everything:
        assert run.info.artifact_uri.startswith((fresh / "artifacts").as_uri()), run.info.artifact_uri
    after = set((REPO / "mlruns").iterdir()) if (REPO / "mlruns").is_dir() else set()
    assert after == before, "artifacts were written into the checkout's mlruns/"


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
