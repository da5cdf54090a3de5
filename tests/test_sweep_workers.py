"""Workers on one study, against temporary stores: resumes, killed and dead workers, several at once,
seeds, and which setting a study resumes under (the README's promises for several workers)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from scenesweep.search.optuna_storage import default_storage

from helpers import REPO
from warm_processes import WarmPopen
from sweep_helpers import all_runs, load, parents_and_children, study_file, sweep, wait_for_running_trial

RESNET18_POOL = {"arch": "resnet18", "layer": "pool"}  # a small network: the trials are quick
WIDE_C = {"C": {"type": "float", "low": 1.0e-3, "high": 1.0e2, "log": True}}

pytestmark = pytest.mark.slow


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
    study = long_mlp_study(tmp_path, flat_scenes, "killed", 1)
    worker = WarmPopen([sys.executable, "-m", "scenesweep", "sweep", str(study), "--heartbeat", "1",
                               "--no-progress"], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_running_trial("killed", 0, timeout=180)
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
    assert killed_run.data.tags["failure"] in ("killed", "stale")  # found by its pid, or its heartbeat
    assert killed_run.info.run_name.endswith(f" · failed: {killed_run.data.tags['failure']}")
    # The killed worker's parent is the study's: the resume attached to it and finished it.
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def start_workers(count, study, *args, heartbeat="30"):
    command = [sys.executable, "-m", "scenesweep", "sweep", str(study), "--no-progress", "--heartbeat", heartbeat, *args]
    return [WarmPopen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(count)]


def test_three_workers_share_one_study_exactly(flat_scenes, tmp_path):
    """Three workers at once: exactly n_trials finish, no two draw the same parameters, one
    parent run holds every trial (each tagged with the worker that ran it), one model version."""
    study = study_file(tmp_path, flat_scenes, "shared", experiment="svm", fixed=RESNET18_POOL, space=WIDE_C,
                       sampler={"name": "tpe", "seed": 0}, n_trials=9, register="scene-classifier")
    workers = start_workers(3, study)
    outputs = [w.communicate(timeout=900) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    trials = load("shared").trials
    states = [(t.number, t.state.name, t.user_attrs.get("failure")) for t in trials]
    assert len(trials) == 9 and all(t.state == TrialState.COMPLETE for t in trials), \
        (states, [err[-2000:] for _, err in outputs])
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
    study = study_file(tmp_path, flat_scenes, "seeded", fixed=RESNET18_POOL, space=WIDE_C,
                       sampler={"name": "random", "seed": 7}, n_trials=3)
    draws = []
    for name in ("first", "second"):
        result = sweep(study, "--storage", f"sqlite:///{tmp_path / (name + '.db')}")
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = optuna.load_study(study_name="seeded", storage=f"sqlite:///{tmp_path / (name + '.db')}")
        draws.append([t.params["C"] for t in loaded.trials])
    assert draws[0] == draws[1] and len(set(draws[0])) == 3


def kill_during_trial(study, number, *args, heartbeat="1", sig=signal.SIGKILL, outputs=None, command=None):
    """Start a worker (``command``, else ``scenesweep sweep STUDY``), send it ``sig`` while trial
    ``number`` runs; returns that trial's params (and, in ``outputs``, the worker's exit status
    and stderr)."""
    command = command or [sys.executable, "-m", "scenesweep", "sweep", str(study), "--heartbeat", heartbeat,
                          "--no-progress", *args]
    worker = WarmPopen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    name = yaml.safe_load(study.read_text())["study"]
    try:
        wait_for_running_trial(name, number, timeout=300)
        time.sleep(1.0)
        worker.send_signal(sig)
    finally:
        _, err = worker.communicate(timeout=60)
    if outputs is not None:
        outputs.update(returncode=worker.returncode, stderr=err)
    return load(name).trials[number].params


def long_mlp_study(tmp_path, flat_scenes, name, n_trials):
    """An mlp study whose trials run long enough (300 epochs) to be killed mid-trial."""
    return study_file(tmp_path, flat_scenes, name, tunes="mlp", experiment="pooling",
                      fixed={"hidden": "64", "epochs": 300},
                      space={"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}, n_trials=n_trials)


def test_sigterm_ends_a_sweep_as_ctrl_c_does_and_leaves_nothing_running(flat_scenes, tmp_path):
    """What Slurm, Kubernetes, systemd and `timeout` send: the running trial FAIL (retried on
    resume), its run KILLED with the signal named, the parent resumable, one line, exit 143."""
    study = long_mlp_study(tmp_path, flat_scenes, "terminated", 1)
    outputs = {}
    params = kill_during_trial(study, 0, heartbeat="300", sig=signal.SIGTERM, outputs=outputs)
    assert outputs["returncode"] == 143, outputs["stderr"][-3000:]
    assert "Traceback" not in outputs["stderr"] and "interrupted (SIGTERM)" in outputs["stderr"]
    assert "Warning" not in outputs["stderr"]  # Optuna's ExperimentalWarning before the one line, no more
    trial, retry = load("terminated").trials
    assert trial.state == TrialState.FAIL and retry.state == TrialState.WAITING and retry.params == params
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # without a resume
    run = next(r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGTERM"
    assert run.data.tags["failure"] == "interrupted" and trial.user_attrs["failure"] == "interrupted"
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "KILLED"
    resumed = sweep(study, "--heartbeat", "300")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load("terminated").trials
    assert trials[1].params == params and trials[1].state == TrialState.COMPLETE  # the interrupted one, retried
    assert not [r.info.run_name for r in all_runs() if r.info.status == "RUNNING"]


def test_sigterm_to_mlflow_run_ends_its_sweep_as_ctrl_c_does(flat_scenes, tmp_path):
    """A scheduler stops `mlflow run` (SIGTERM to its pid): its child, the sweep, is told by the
    kernel (PR_SET_PDEATHSIG) and ends as after Ctrl-C: nothing left RUNNING, the trial retried."""
    study = long_mlp_study(tmp_path, flat_scenes, "mlflow_terminated", 2)
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_bin, "run", ".", "-e", "sweep", "--env-manager", "local", "--experiment-name", "pooling",
               "-P", f"file={study}"]
    kill_during_trial(study, 0, sig=signal.SIGTERM, command=command)
    stopped = time.time()
    child = load("mlflow_terminated").trials[0].user_attrs["worker"]["pid"]  # the sweep mlflow run started
    deadline = time.time() + 120  # the orphaned child cleans up after mlflow run is gone
    while time.time() < deadline and psutil.pid_exists(child) and \
            psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, \
        "the sweep outlived mlflow run"
    print(f"the sweep exited {time.time() - stopped:.1f} s after mlflow run's own exit")  # README: how fast
    while time.time() < deadline:
        runs = all_runs()
        if runs and not [r for r in runs if r.info.status == "RUNNING"]:
            break
        time.sleep(1)
    trial = load("mlflow_terminated").trials[0]
    assert trial.state == TrialState.FAIL
    runs = {r.info.run_id: r for r in all_runs()}
    assert not [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"]
    trial_run = runs[trial.user_attrs["mlflow_run_id"]]
    assert trial_run.info.status == "KILLED" and trial_run.data.tags["signal"] == "SIGTERM"


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
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed = next(r for r in runs if r.info.run_id == trials[0].user_attrs["mlflow_run_id"])
    assert killed.data.tags["failure"] == "killed"  # its process known dead on this host
    assert trials[0].user_attrs["failure"] == "killed"


def test_a_dead_worker_elsewhere_is_found_by_its_heartbeat(flat_scenes, tmp_path):
    """A trial whose worker ran on another machine (its pid cannot be checked here) is failed
    once its heartbeat goes stale, retried, and its run ends FAILED: the sweep waits it out."""
    study = long_mlp_study(tmp_path, flat_scenes, "elsewhere", 1)
    # Heartbeats every 2 s: the trial is (most likely) not stale yet when the resume starts, so
    # it waits; when it is already stale the resume fails it at start: the same outcome.
    kill_during_trial(study, 0, heartbeat="2")
    storage = optuna.storages.RDBStorage(default_storage())
    frozen = load("elsewhere").trials[0]
    storage.set_trial_user_attr(frozen._trial_id, "worker", {**frozen.user_attrs["worker"], "host": "another-machine"})
    result = sweep(study, "--heartbeat", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("elsewhere").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    runs = {r.info.run_id: r for r in all_runs()}
    killed = runs[trials[0].user_attrs["mlflow_run_id"]]
    assert killed.info.status == "FAILED" and "another-machine" in killed.data.tags["error"]
    assert "heartbeat went stale" in killed.data.tags["error"] and killed.data.tags["failure"] == "stale"
    assert trials[0].user_attrs["failure"] == "stale"
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
    runs = [WarmPopen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
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


def test_a_study_does_not_resume_under_another_setting(flat_scenes, tmp_path):
    args = ("--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"), "--no-register", "--n_trials", "1")
    first = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), *args)
    assert first.returncode == 0, first.stderr[-4000:]
    other = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), "--image_size", "48", *args)
    assert other.returncode == 2 and "image_size: 32 -> 48" in other.stderr and "--study_name" in other.stderr
    renamed = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), "--image_size", "48",
                    "--study_name", "sweep_svm_48px", *args)
    assert renamed.returncode == 0, renamed.stderr[-4000:]


def test_a_worker_with_the_same_images_under_another_path_joins_the_study(flat_scenes, tmp_path):
    """Machines keep the dataset where they like: the study knows its images by content."""
    args = ("--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"), "--no-register")
    first = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(flat_scenes), "--n_trials", "1", *args)
    assert first.returncode == 0, first.stderr[-4000:]
    elsewhere = shutil.copytree(flat_scenes, tmp_path / "mnt" / "15-Scene")
    joined = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(elsewhere), "--n_trials", "2", *args)
    assert joined.returncode == 0, joined.stderr[-4000:]
    assert [t.state.name for t in load().trials] == ["COMPLETE", "COMPLETE"]
    next(iter(sorted(elsewhere.glob("*/*")))).unlink()  # other content under the same path
    changed = sweep(REPO / "sweeps" / "svm_c.yaml", "--data", str(elsewhere), "--n_trials", "3", *args)
    assert changed.returncode == 2 and "dataset:" in changed.stderr and "--study_name" in changed.stderr, \
        changed.stderr


def test_a_tracking_store_without_room_is_refused_before_any_run(flat_scenes, tmpfs, monkeypatch):
    """Less than 64 MB where MLflow and Optuna write: one line naming the folder, before anything exists."""
    disk = tmpfs("store_disk", 16)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk / 'mlflow.db'}")
    result = sweep(long_mlp_study(disk.parent, flat_scenes, "no_room", 1))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(disk) in errors[0] and "MB free" in errors[0] and "at least 64 MB" in errors[0]
    assert not list(disk.iterdir())  # no database, no study, no run


def test_a_store_disk_filling_up_mid_sweep_ends_everything_and_the_sweep_resumes(flat_scenes, tmpfs, monkeypatch):
    """The store's disk fills while a trial runs: the trial's run and the parent end FAILED (in the
    space of the store's reserve), the trial is failed and retried, one line, exit 2; once there
    is room again the same command finishes the study."""
    disk = tmpfs("store_disk", 96)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{disk / 'mlflow.db'}")
    study = long_mlp_study(disk.parent, flat_scenes, "filled", 1)
    worker = WarmPopen([sys.executable, "-m", "scenesweep", "sweep", str(study), "--no-progress"], cwd=REPO,
                              env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    filler = disk / "filler"
    try:
        wait_for_running_trial("filled", 0, timeout=300)
        with open(filler, "wb") as out:  # the disk full, as another process would fill it
            with pytest.raises(OSError):
                while True:
                    out.write(b"\0" * 2**20)
                    out.flush()
    finally:
        _, err = worker.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert worker.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"tracking store {disk}: the disk is full" in errors[0]
    trial, retry = load("filled").trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "error" and retry.state == TrialState.WAITING
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs} == {"FAILED"}  # the trial's run and the parent
    filler.unlink()
    resumed = sweep(study)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [t.state for t in load("filled").trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert not [r.info.run_name for r in all_runs() if r.info.status == "RUNNING"]
