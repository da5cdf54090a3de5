"""``scenesweep services``: a real PostgreSQL and a real ``mlflow server``, no mocks.

One services instance (tests/services_fixture.py) serves the module, on free ports of
127.0.0.1; the tests run in file order and the last ones kill, restart and stop it. Bad input
needs no running services.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from scenesweep.services import servers
from scenesweep.services import shared_services as services
from helpers import run_cli
from services_fixture import postgres_services  # noqa: F401  (a fixture, found by name)

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("services", *args, env=env, timeout=300, process=True)


def cli_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A services command that starts nothing (refused, or reading a folder), in this process."""
    return run_cli("services", *args, env=env)


def evaluated(exports: str) -> dict[str, str]:
    """What a shell has after ``eval "$EXPORTS"``."""
    script = 'eval "$1"; printf "%s\\n%s\\n" "$MLFLOW_TRACKING_URI" "$OPTUNA_STORAGE"'
    result = subprocess.run(["bash", "-c", script, "bash", exports], capture_output=True, text=True, check=True,
                            env={"PATH": os.environ["PATH"]})
    tracking, storage = result.stdout.splitlines()
    return {"MLFLOW_TRACKING_URI": tracking, "OPTUNA_STORAGE": storage}


def mlflow_group(directory: Path) -> list[psutil.Process]:
    """The MLflow server's live processes (the leader and its uvicorn children)."""
    pid = json.loads((directory / "services.json").read_text())["mlflow_pid"]
    return servers.group_members(pid) if pid else []


def postmaster_pid(directory: Path) -> int:
    return int((directory / "pg" / "postmaster.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_second_start_says_so_and_prints_the_same_exports(postgres_services):
    result = cli("start", "--dir", str(postgres_services.dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "already run" in result.stderr
    assert evaluated(result.stdout) == {"MLFLOW_TRACKING_URI": postgres_services.tracking_uri,
                                        "OPTUNA_STORAGE": postgres_services.storage_url}
    assert postgres_services.tracking_uri.startswith("http://127.0.0.1:")
    assert postgres_services.storage_url.startswith("postgresql://scenesweep:")
    assert postgres_services.storage_url.endswith("/optuna")


def test_both_databases_accept_the_printed_url_and_nothing_else(postgres_services):
    for url, name in ((postgres_services.storage_url, "optuna"), (postgres_services.mlflow_database_url, "mlflow")):
        with psycopg.connect(url, connect_timeout=5) as connection:
            assert connection.execute("SELECT current_database()").fetchone()[0] == name
            # Room for many workers (each holds up to 4 connections, the MLflow server 15).
            assert int(connection.execute("SHOW max_connections").fetchone()[0]) >= 300
    psql = services.postgres_bin() / "psql"
    result = subprocess.run([str(psql), postgres_services.storage_url, "-XAtc", "SELECT current_user"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "scenesweep", result.stderr
    running = postgres_services.services
    for user, password, database in (("scenesweep", "wrong", "optuna"), ("postgres", running.password, "postgres"),
                                     ("scenesweep", running.password, "postgres")):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=running.pg_port, user=user, password=password, dbname=database,
                            connect_timeout=5)


CLIENT = textwrap.dedent("""
    import json, os, sys, tempfile
    import mlflow, optuna
    mlflow.set_experiment("services-check")
    with mlflow.start_run() as run:
        mlflow.log_metric("val/acc", 0.75)
        path = os.path.join(tempfile.mkdtemp(), "hello.txt")
        with open(path, "w") as file:
            file.write("proxied")
        mlflow.log_artifact(path, artifact_path="notes")
    study = optuna.create_study(storage=os.environ["OPTUNA_STORAGE"], study_name="services-check")
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
    print(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "artifact_uri": run.info.artifact_uri, "trials": len(study.trials)}))
""")


def test_a_client_tracks_a_run_and_a_study_through_the_services(postgres_services, tmp_path):
    exports = evaluated(postgres_services.services.exports())
    # A worker as on another machine: its environment is the exports, its folder is elsewhere.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true", **exports}
    result = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["artifact_uri"].startswith("mlflow-artifacts:/")
    run_folder = postgres_services.dir / "artifacts" / out["experiment_id"] / out["run_id"]
    landed = run_folder / "artifacts" / "notes" / "hello.txt"
    assert landed.read_text() == "proxied"
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()  # nothing local
    run = MlflowClient(tracking_uri=postgres_services.tracking_uri).get_run(out["run_id"])
    assert run.data.metrics["val/acc"] == 0.75
    assert postgres_services.services.password not in json.dumps([run.data.tags, run.data.params])
    assert out["trials"] == 3
    with psycopg.connect(postgres_services.storage_url) as connection:
        states = connection.execute("SELECT state FROM trials t JOIN studies s USING (study_id) "
                                    "WHERE s.study_name = 'services-check'").fetchall()
    assert [state for (state,) in states] == ["COMPLETE"] * 3


def test_workers_logging_the_same_dataset_at_once_all_go_on(postgres_services, flat_scenes, monkeypatch):
    """Workers starting together log the same splits as MLflow datasets into their runs at once:
    on PostgreSQL behind the MLflow server two inserts of one (experiment, name, digest) race, and
    the loser got BAD_REQUEST UniqueViolation (a worker died at start, exit 2). Several rounds of
    six threads released together, each round a new split (a new digest): none fails."""
    import threading

    import mlflow

    from scenesweep.compute.training import load_data
    from scenesweep.core.config import make_config
    from scenesweep.tracking import sink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_services.tracking_uri)
    mlflow.set_tracking_uri(postgres_services.tracking_uri)
    client = MlflowClient()
    experiment = client.create_experiment(f"dataset-race-{os.getpid()}-{time.time_ns()}")
    for seed in range(4):
        dataset, split = load_data(make_config("svm", {"data": str(flat_scenes), "train_per_class": 10, "seed": seed}))
        runs = [client.create_run(experiment).info.run_id for _ in range(6)]
        barrier, errors = threading.Barrier(len(runs)), []

        def log(run_id: str) -> None:
            barrier.wait()
            try:
                sink.log_datasets(run_id, dataset, split)
            except Exception as error:  # noqa: BLE001  (what a worker would have died of)
                errors.append(error)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        for run_id in runs:
            assert len(client.get_run(run_id).inputs.dataset_inputs) == 3  # training, validation, test


def test_the_password_stays_out_of_command_lines_logs_and_state(postgres_services):
    password, directory = postgres_services.services.password, postgres_services.dir
    group = mlflow_group(directory)
    assert len(group) >= 2  # the mlflow leader and its uvicorn worker
    for process in group:
        assert password not in " ".join(process.cmdline())
        assert password not in json.dumps(process.environ())  # PGPASSFILE names the file only
    postmaster = psutil.Process(postmaster_pid(directory))
    for process in [postmaster, *postmaster.children()]:
        assert password not in " ".join(process.cmdline())
    for name in ("logs/mlflow.log", "logs/postgres.log", "services.json"):
        assert password not in (directory / name).read_text(errors="replace"), name
    passfile = directory / "pgpass"
    assert oct(passfile.stat().st_mode & 0o777) == "0o600" and password in passfile.read_text()


def test_status_reports_both_up(postgres_services):
    result = cli("status", "--dir", str(postgres_services.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["postgresql", "mlflow"]
    assert all("running (pid" in line and line.endswith("answers") for line in lines)
    assert postgres_services.tracking_uri in lines[1]


def test_restart_postgres_keeps_the_tracking_server_working(postgres_services):
    before = postmaster_pid(postgres_services.dir)
    postgres_services.restart_postgres()
    assert postmaster_pid(postgres_services.dir) != before
    client = MlflowClient(tracking_uri=postgres_services.tracking_uri)
    assert any(e.name == "services-check" for e in client.search_experiments())  # the pool reconnected
    with psycopg.connect(postgres_services.storage_url) as connection:
        assert connection.execute("SELECT count(*) FROM studies").fetchone()[0] >= 1


def test_killed_services_read_not_running_and_start_again(postgres_services):
    directory = postgres_services.dir
    victims = mlflow_group(directory)
    postmaster = psutil.Process(postmaster_pid(directory))
    victims += [postmaster, *postmaster.children()]
    for process in victims:  # as after a power cut: nothing shuts down cleanly
        process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(alive(p.pid) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.2)
    status = cli("status", "--dir", str(directory))
    assert status.returncode == 3 and status.stdout.count("not running") == 2, status.stdout + status.stderr
    started = cli("start", "--dir", str(directory))
    assert started.returncode == 0, started.stderr
    # Same ports and password as before: the exports workers already hold stay valid.
    assert evaluated(started.stdout)["OPTUNA_STORAGE"] == postgres_services.storage_url
    assert cli("status", "--dir", str(directory)).returncode == 0


def wait_gone(processes, seconds=20):
    deadline = time.monotonic() + seconds
    while any(alive(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_partial_outage_restarts_only_what_is_down_on_the_same_ports(postgres_services):
    """PostgreSQL alone down, then the MLflow server alone: `services start` restarts just that
    one, on its old port, and prints the same exports; `stop` stops every server it started."""
    directory = postgres_services.dir
    exports = {"MLFLOW_TRACKING_URI": postgres_services.tracking_uri, "OPTUNA_STORAGE": postgres_services.storage_url}
    mlflow_before = [p.pid for p in mlflow_group(directory)]
    postmaster = psutil.Process(postmaster_pid(directory))
    postmaster.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown: the database alone goes away
    wait_gone([postmaster])
    started = cli("start", "--dir", str(directory))
    assert started.returncode == 0, started.stderr
    assert evaluated(started.stdout) == exports
    assert [p.pid for p in mlflow_group(directory)] == mlflow_before  # the MLflow server kept running
    for process in mlflow_group(directory):
        process.send_signal(signal.SIGKILL)  # now the MLflow server alone
    wait_gone([psutil.Process(pid) for pid in mlflow_before if alive(pid)])
    postmaster_now = postmaster_pid(directory)
    started = cli("start", "--dir", str(directory))
    assert started.returncode == 0, started.stderr
    assert evaluated(started.stdout) == exports and postmaster_pid(directory) == postmaster_now
    assert cli("status", "--dir", str(directory)).returncode == 0


def test_stop_leaves_no_process_and_no_port(postgres_services):
    directory, running = postgres_services.dir, postgres_services.services
    processes = mlflow_group(directory)
    postmaster = psutil.Process(postmaster_pid(directory))
    processes += [postmaster, *postmaster.children()]
    result = cli("stop", "--dir", str(directory))
    assert result.returncode == 0 and "stopped mlflow and postgresql" in result.stderr, result.stderr
    assert not [p for p in processes if alive(p.pid)]
    assert servers.port_is_free(running.pg_port) and servers.port_is_free(running.mlflow_port)
    assert cli("status", "--dir", str(directory)).returncode == 3
    again = cli("stop", "--dir", str(directory))
    assert again.returncode == 0 and "nothing runs" in again.stderr


@pytest.fixture
def listening():
    """A port something listens on, on 127.0.0.1."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def bad_inputs(tmp_path: Path, port: int) -> list[tuple[list[str], dict, str]]:
    (tmp_path / "a_file").write_text("not a folder")
    free = str(servers.free_port())
    cases = [
        (["start", "--dir", str(tmp_path / "a_file")], {}, "is a file"),
        (["status", "--dir", str(tmp_path / "a_file")], {}, "is a file"),
        (["start", "--dir", str(tmp_path / "s1"), "--pg-port", str(port)], {},
         f"--pg-port {port}: the port is already in use"),
        (["start", "--dir", str(tmp_path / "s2"), "--pg-port", free, "--mlflow-port", str(port)], {},
         f"--mlflow-port {port}: the port is already in use"),
        (["start", "--dir", str(tmp_path / "s3"), "--pg-port", "70000"], {}, "between 1 and 65535"),
        (["start", "--dir", str(tmp_path / "s4"), "--host", "203.0.113.7"], {}, "not an IPv4 address of this machine"),
        (["start", "--dir", str(tmp_path / "s5")], {"SCENESWEEP_POSTGRES_BIN": str(tmp_path / "nowhere")},
         "PostgreSQL is not installed"),
    ]
    if os.geteuid() == 0:  # pytest's tmp folders sit in a 0700 folder the postgres user cannot enter
        cases.append((["start", "--dir", str(tmp_path / "s6"), "--pg-port", free], {}, "chmod o+x"))
    return cases


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, listening):
    for args, env, message in bad_inputs(tmp_path, listening):
        result = cli_here(*args, env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    assert not list(tmp_path.rglob("PG_VERSION"))  # refused before anything was created


def test_status_and_stop_of_a_folder_without_services(tmp_path):
    status = cli_here("status", "--dir", str(tmp_path / "none"))
    assert status.returncode == 3 and status.stdout.count("not running") == 2
    stop = cli_here("stop", "--dir", str(tmp_path / "none"))
    assert stop.returncode == 0 and "nothing runs" in stop.stderr
