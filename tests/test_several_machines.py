"""Sweeps on shared services, as on several machines: PostgreSQL for Optuna, an MLflow server.

One real PostgreSQL cluster and one real ``mlflow server`` (proxied artifacts) serve the module
(tests/services_fixture.py). Workers are real ``scenesweep sweep`` processes with
``MLFLOW_TRACKING_URI=http://...`` and ``OPTUNA_STORAGE=postgresql://...``, as the exports of
``scenesweep services start`` set them. Each test has its own study, experiment and (where a
test needs a new database) its own empty schema in the ``optuna`` database, so the tests do not
depend on each other's order. Tiny data: 3 classes, 32 px, 10 training images per class, ResNet-18 pool features (the smallest backbone).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from scenesweep.services import servers
from scenesweep.services import shared_services as services

from helpers import CLASSES, post_json, run_cli, wait_until_serving
from remote_workers import (assert_no_password, assert_nothing_running, finish, fresh_schema, load, mlp_study,
                            parent_and_children, rdb, start_workers, svm_study, trials_of, wait_for_running_trial)
from services_fixture import postgres_services  # noqa: F401  (a fixture, found by name)

pytestmark = pytest.mark.slow


# --- the services, as a worker machine sees them ---------------------------------------------

@pytest.fixture
def remote(postgres_services, monkeypatch):
    """This test's processes talk to the services only: the server and the optuna database."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_services.tracking_uri)
    monkeypatch.setenv("OPTUNA_STORAGE", postgres_services.storage_url)
    import mlflow

    mlflow.set_tracking_uri(postgres_services.tracking_uri)
    return postgres_services


# --- many workers, one study -------------------------------------------------------------------

def test_three_workers_on_a_fresh_database_share_one_study_exactly(remote, flat_scenes, tmp_path):
    """Three workers started together on a database Optuna has never seen all come up (the schema
    is created once); together they finish exactly n_trials, no parameter set twice; the study
    is one parent run holding every trial, each nested and tagged with its worker; one model
    version is registered; nothing stays RUNNING and the password is nowhere."""
    storage = fresh_schema(remote)
    name = f"three_{uuid.uuid4().hex[:6]}"
    model = f"sc-{name}"
    study = svm_study(tmp_path, flat_scenes, name, n_trials=9, register=model)
    workers = start_workers(3, study, env={"OPTUNA_STORAGE": storage})
    outputs = finish(workers)
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]

    trials = load(name, storage).trials
    assert len(trials) == 9 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 9
    runs, parents, children = parent_and_children(name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert load(name, storage).user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert len(children) == 9 and {c.data.tags[MLFLOW_PARENT_RUN_ID] for c in children} == {parent.info.run_id}
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    assert set(by_run) == {c.info.run_id for c in children}
    for child in children:
        worker = by_run[child.info.run_id].user_attrs["worker"]
        assert child.data.tags["host"] == worker["host"] and child.data.tags["pid"] == str(worker["pid"])
        assert child.data.tags["trial_number"] == str(by_run[child.info.run_id].number)
        assert child.info.status == "FINISHED"
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/"), child.info.artifact_uri
    assert {c.data.tags["pid"] for c in children} <= {str(w.pid) for w in workers}
    # One worker summarised and registered.
    assert sum("best trial #" in out for out, _ in outputs) == 1
    trials = load(name, storage).trials
    best = max(trials, key=lambda t: (t.value, -t.number))  # the first of equal values
    assert parent.data.tags["best_trial"] == str(best.number)
    versions = MlflowClient().search_model_versions(f"name='{model}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == parent.data.tags["best_run_id"]  # the best trial's model
    assert versions[0].tags["parent_run_id"] == parent.info.run_id
    assert parent.data.tags["optuna.storage"].startswith("postgresql://scenesweep:***@")
    assert_nothing_running(runs)
    assert_no_password(remote, runs, outputs)


def test_a_worker_killed_mid_trial_is_failed_and_retried_by_the_others(remote, flat_scenes, tmp_path):
    """SIGKILL one of two workers while it runs a trial: the other fails that trial at once
    (same host, its pid is gone), ends its run FAILED, retries its parameters; exactly n_trials
    complete and nothing stays RUNNING."""
    storage = remote.storage_url
    name = f"killed_{uuid.uuid4().hex[:6]}"
    study = mlp_study(tmp_path, flat_scenes, name, n_trials=3, epochs=100)
    workers = start_workers(2, study, heartbeat="5")
    try:
        victim_trial = wait_for_running_trial(name, storage, {w.pid for w in workers})
        victim = next(w for w in workers if w.pid == victim_trial.user_attrs["worker"]["pid"])
        time.sleep(1.0)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        survivors = [w for w in workers if w is not victim]
        outputs = finish(survivors)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (_, err) in zip(survivors, outputs):
        assert worker.returncode == 0, err[-4000:]
    assert victim.returncode == -signal.SIGKILL

    trials = load(name, storage).trials
    killed = trials[victim_trial.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 4
    runs, parents, children = parent_and_children(name)
    by_id = {r.info.run_id: r for r in runs}
    killed_run = by_id[killed.user_attrs["mlflow_run_id"]]
    assert killed_run.info.status == "FAILED"
    assert f"{victim.pid}" in killed_run.data.tags["error"] and "retried" in killed_run.data.tags["error"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    assert_nothing_running(runs)
    assert_no_password(remote, runs, outputs)


def test_a_dead_worker_on_another_machine_is_found_by_its_heartbeat(remote, flat_scenes, tmp_path):
    """A trial whose worker ran elsewhere (its host is not this one, so no pid can be checked)
    is failed once its heartbeat is stale, its run ends FAILED, its parameters are retried."""
    storage = remote.storage_url
    name = f"elsewhere_{uuid.uuid4().hex[:6]}"
    study = mlp_study(tmp_path, flat_scenes, name, n_trials=2, epochs=100)
    (lone,) = start_workers(1, study, heartbeat="3")
    try:
        wait_for_running_trial(name, storage, {lone.pid}, number=0)
        time.sleep(1.0)
        lone.send_signal(signal.SIGKILL)
    finally:
        lone.kill()
        lone.wait(30)
    frozen = load(name, storage).trials[0]
    assert frozen.state == TrialState.RUNNING
    rdb(storage).set_trial_user_attr(frozen._trial_id, "worker",
                                     {**frozen.user_attrs["worker"], "host": "another-machine"})
    workers = start_workers(1, study, heartbeat="3")  # the resuming worker, on "this" machine
    outputs = finish(workers)
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    trials = load(name, storage).trials
    assert trials[0].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 3
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == frozen.params
    runs, parents, _ = parent_and_children(name)
    killed = {r.info.run_id: r for r in runs}[frozen.user_attrs["mlflow_run_id"]]
    assert killed.info.status == "FAILED"
    assert "another-machine" in killed.data.tags["error"] and "heartbeat went stale" in killed.data.tags["error"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert_nothing_running(runs)


def test_a_database_restart_mid_sweep_is_survived(remote, flat_scenes, tmp_path):
    """PostgreSQL stops (fast shutdown: every session cut, the study lock's included) while a
    worker runs a trial and comes back 6 s later: the worker waits and retries, and the study
    completes with exactly n_trials, nothing RUNNING."""
    storage = remote.storage_url
    name = f"restart_{uuid.uuid4().hex[:6]}"
    study = mlp_study(tmp_path, flat_scenes, name, n_trials=3, epochs=100)
    workers = start_workers(1, study, heartbeat="10")
    try:
        deadline = time.monotonic() + 300
        while not any(t.state == TrialState.COMPLETE for t in trials_of(name, storage)):
            assert time.monotonic() < deadline, "no trial completed within 300 s"
            assert all(w.poll() is None for w in workers), [w.output()[1][-3000:] for w in workers]
            time.sleep(0.5)
        wait_for_running_trial(name, storage, {w.pid for w in workers})
        services.restart_postgres(remote.dir, down_s=6)
        outputs = finish(workers)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
    trials = load(name, storage).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3, [t.state for t in trials]
    runs, parents, children = parent_and_children(name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert_nothing_running(runs)
    assert_no_password(remote, runs, outputs)


# --- the registry through the server ---------------------------------------------------------

def hidden_from(folder: Path, command: list[str]) -> list[str]:
    """``command`` run where ``folder`` reads as empty (a private mount namespace with a tmpfs
    over it), when this machine allows it (root, unshare); else ``command`` as it is."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return command
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True)
    if probe.returncode:
        return command
    return [unshare, "--mount", "sh", "-c", 'mount -t tmpfs scenesweep-hidden "$0" && exec "$@"', str(folder),
            *command]


@contextlib.contextmanager
def served_hidden_from(folder: Path, model_uri: str, cwd: Path, log_path: Path) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI`` started in ``cwd`` where ``folder`` reads as empty; its
    base URL once it answers /ping; stopped (its whole process group) afterwards."""
    port = servers.free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(hidden_from(folder, [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
                                                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]),
                                  stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/ping", server, log_path, timeout_s=120)
        yield base
    finally:
        servers.stop(server)  # its whole process group (the server and its uvicorn worker)


def test_promote_predict_and_serve_through_the_server(remote, flat_scenes, tmp_path):
    """A model registered through the server is promoted, predicted with and served from a
    folder that cannot see the services' artifact directory: artifacts come through the proxy.
    A ResNet-18 with an SVM on its pooled features: served over REST as a VGG one is."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = "scene-classifier"
    trained = run_cli("svm", "--data", str(flat_scenes), "--train_per_class", "10", "--arch", "resnet18", "--layer", "pool",
                      "--image_size", "32", "--cache_dir", str(tmp_path / "cache"), "--register", model,
                      "--no-progress", cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr[-4000:]
    client = MlflowClient()
    (version,) = client.search_model_versions(f"name='{model}'")
    record = client.get_logged_model(version.tags["model_id"])
    assert (record.params["arch"], record.params["layer"]) == ("resnet18", "pool")
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

    def cli(*args):
        command = hidden_from(remote.dir, [sys.executable, "-m", "scenesweep", *args])
        return subprocess.run(command, capture_output=True, text=True, cwd=elsewhere, env=dict(os.environ),
                              timeout=300)

    promoted = cli("promote", "--name", model)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert client.get_registered_model(model).aliases.get("champion") == version.version
    images = sorted(flat_scenes.glob("*/*"))[:: 7]
    predicted = cli("predict", *map(str, images), "--json")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = json.loads(predicted.stdout)
    assert [r["file"] for r in rows] == list(map(str, images)) and {r["label"] for r in rows} <= set(CLASSES)

    with served_hidden_from(remote.dir, f"models:/{model}@champion", elsewhere, tmp_path / "serve.log") as base:
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images]}}
        status, answer = post_json(f"{base}/invocations", body)
        assert status == 200, answer
        assert [p["label"] for p in answer["predictions"]] == [r["label"] for r in rows]
    assert not list(elsewhere.iterdir()), f"files written in the client's folder: {list(elsewhere.iterdir())}"


def test_every_storage_call_a_study_makes_waits_out_an_outage():
    """A Study holds Optuna's _CachedStorage, which calls some private methods of the RDB storage
    directly: each of them, and every public storage method, retries while PostgreSQL is away."""
    import inspect
    import re

    from optuna.storages import BaseStorage, RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    from scenesweep.search.optuna_storage import ResilientRDBStorage

    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_CachedStorage)))
    public = {name for name, _ in inspect.getmembers(BaseStorage, inspect.isfunction) if not name.startswith("_")}
    local = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session"}  # no database
    for name in sorted((called | public) - local):
        if name not in vars(RDBStorage):  # BaseStorage's own helpers call the methods below
            continue
        assert hasattr(getattr(ResilientRDBStorage, name), "__wrapped__"), f"{name} is not retried"
