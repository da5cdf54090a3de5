"""Trials per minute with 1, 2 and 3 workers on one study: SQLite against PostgreSQL + an MLflow server.

Two set-ups, each measured with 1, 2 and 3 concurrent ``scenesweep sweep`` processes on one
study of ``--trials`` trials (a new study per measurement):

- **sqlite**: the one-machine default, ``optuna.db`` and ``mlflow.db`` (SQLite files) in a
  temporary folder;
- **postgres+http**: what several machines use: ``scenesweep services start`` in a temporary
  folder (a real PostgreSQL cluster with databases ``optuna`` and ``mlflow``, and ``mlflow
  server`` on it, artifacts proxied), the workers reading ``OPTUNA_STORAGE`` and
  ``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT``.

The trials are cached SVM fits (relu7 of VGG16 with random weights, digits at 32 px): the
features are extracted once before the first measurement, so a trial costs its fit, its MLflow
run and its storage calls, and the storage and tracking back-ends show. Printed per row:

- wall: first worker launched to last worker exited (process start, imports, the setting's
  checks, the summary of the study and the parent run included);
- trials/min over the wall, and over the span of the trials themselves (first trial started to
  last trial finished, from the Optuna storage);
- the median trial (Optuna's start to complete), and the trial counts (exactly ``--trials``
  complete, none RUNNING: the benchmark checks it).

Then the overhead of tracking over HTTP, in one process against the same two stores: one
trial's MLflow calls (create a nested run, log params and tags, one ``log_batch`` of 40
metrics, one small artifact, end it), median of ``--calls`` repetitions, in ms and as a share
of the median trial.

Usage:
    .venv/bin/python benchmarks/workers.py [--trials 12] [--workers 1,2,3] [--calls 20]

Needs Debian's postgresql package (``make services`` or ``make test`` installs it) and the
``postgres`` extra (psycopg 3). On 2 cores, three workers share two cores: the figures say
what one machine's workers cost each other, not how several machines scale. Nothing is written
to the project's ``mlruns/`` or ``.cache``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, objective_overhead, table  # noqa: E402  (the benchmarks' shared helpers)

STUDY = """\
study: STUDY
experiment: EXPERIMENT
tunes: svm
fixed: {layer: relu7, image_size: 32, cache_dir: "CACHE"}
space:
  C: {type: float, low: 1.0e-4, high: 1.0e2, log: true}
sampler: {name: tpe, seed: 0}
n_trials: TRIALS
register: ""
"""


def base_env(tracking_uri: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "SCENESWEEP_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO / "src")}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "OPTUNA_STORAGE"):
        env.pop(name, None)
    return env


def scenesweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "scenesweep", *args]


@contextlib.contextmanager
def postgres_services(tmp: Path) -> Iterator[dict]:
    """``scenesweep services start`` in ``tmp`` on ports the kernel picks; its exports; stopped after."""
    # Under root PostgreSQL runs as the postgres user, which must pass through the folder.
    tmp.chmod(0o711)
    directory = tmp / "services"
    sys.path.insert(0, str(REPO / "src"))
    from scenesweep.services import servers

    pg_port = servers.free_port()
    mlflow_port = servers.free_port()
    while mlflow_port == pg_port:
        mlflow_port = servers.free_port()
    started = subprocess.run(scenesweep("services", "start", "--dir", str(directory), "--pg-port", str(pg_port),
                                        "--mlflow-port", str(mlflow_port)),
                             capture_output=True, text=True, env=base_env("sqlite:///unused"), cwd=tmp)
    try:
        if started.returncode:
            raise SystemExit(f"could not start the services: {started.stderr.strip().splitlines()[-1:]}")
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                       if line.startswith("export "))
        yield exports
    finally:
        subprocess.run(scenesweep("services", "stop", "--dir", str(directory)), capture_output=True,
                       env=base_env("sqlite:///unused"), cwd=tmp)


def run_workers(count: int, study_file: Path, env: dict, logs: Path) -> float:
    """``count`` concurrent ``scenesweep sweep`` processes; the wall seconds until all exited."""
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    workers = []
    for index in range(count):
        out = open(logs / f"{study_file.stem}.{index}.log", "w")
        workers.append((subprocess.Popen(scenesweep("sweep", str(study_file), "--no-progress"), env=env, cwd=logs,
                                         stdout=out, stderr=subprocess.STDOUT), out))
    for worker, out in workers:
        worker.wait()
        out.close()
    wall = time.perf_counter() - start
    failed = [index for index, (worker, _) in enumerate(workers) if worker.returncode]
    if failed:
        log = (logs / f"{study_file.stem}.{failed[0]}.log").read_text()[-3000:]
        raise SystemExit(f"worker {failed[0]} of {study_file.stem} exited {workers[failed[0]][0].returncode}:\n{log}")
    return wall


def measure(setup: str, count: int, trials: int, tmp: Path, storage: str, env: dict) -> dict:
    import optuna

    name = f"workers_{setup.replace('+', '_')}_{count}_{uuid.uuid4().hex[:6]}"
    study_file = tmp / f"{name}.yaml"
    study_file.write_text(STUDY.replace("STUDY", name).replace("EXPERIMENT", name)
                          .replace("CACHE", str(tmp / "cache")).replace("TRIALS", str(trials)))
    wall = run_workers(count, study_file, {**env, "OPTUNA_STORAGE": storage}, tmp / "logs")
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state.name for t in study.trials]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) != trials or "RUNNING" in states:
        raise SystemExit(f"{name}: expected {trials} COMPLETE and none RUNNING, got {states}")
    span = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    return {"setup": setup, "workers": count, "wall_s": wall, "per_min_wall": 60 * trials / wall,
            "per_min_span": 60 * trials / span, "median_trial_s": statistics.median(durations),
            "states": {s: states.count(s) for s in sorted(set(states))}}


def tracking_calls_ms(tracking_uri: str, storage_url: str, calls: int, tmp: Path) -> float:
    """Median ms one trial spends in the real Objective beyond its compute (its MLflow calls,
    dashboard note and kept head) against ``tracking_uri`` and ``storage_url``, in this process."""
    measured = objective_overhead(tracking_uri, storage_url, {"data": "digits", "image_size": 32,
                                                              "cache_dir": str(tmp / "cache")}, calls)
    return 1000 * (statistics.median(measured["trial_s"]) - statistics.median(measured["compute_s"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per study (default 12)")
    parser.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated (default 1,2,3)")
    parser.add_argument("--calls", type=int, default=20, help="repetitions of one trial's MLflow calls")
    parser.add_argument("--setups", default="sqlite,postgres+http", help="which set-ups (default both)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]
    setups = args.setups.split(",")
    print(f"load average at start: {load_average()}; {os.cpu_count()} CPUs; {args.trials} trials per study")

    tmp = Path(tempfile.mkdtemp(prefix="scenesweep-workers-"))
    rows, overhead = [], {}
    try:
        sqlite_tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        sqlite_storage = f"sqlite:///{tmp / 'optuna.db'}"
        # The features once, before anything is timed (every study reads this cache).
        warm = subprocess.run(scenesweep("extract", "--layer", "relu7", "--image_size", "32", "--cache_dir",
                                         str(tmp / "cache"), "--no-progress"),
                              capture_output=True, text=True, env=base_env(sqlite_tracking), cwd=tmp)
        if warm.returncode:
            raise SystemExit(f"extraction failed:\n{warm.stderr[-3000:]}")
        with contextlib.ExitStack() as stack:
            targets = {}
            if "sqlite" in setups:
                targets["sqlite"] = (sqlite_storage, sqlite_tracking)
            if "postgres+http" in setups:
                exports = stack.enter_context(postgres_services(tmp))
                targets["postgres+http"] = (exports["OPTUNA_STORAGE"], exports["MLFLOW_TRACKING_URI"])
            for setup, (storage, tracking_uri) in targets.items():
                for count in counts:
                    row = measure(setup, count, args.trials, tmp, storage, base_env(tracking_uri))
                    rows.append(row)
                    print(f"  {setup}, {count} worker(s): {row['wall_s']:.1f} s, {row['states']}", flush=True)
                overhead[setup] = tracking_calls_ms(tracking_uri, storage, args.calls, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    one = {row["setup"]: row for row in rows if row["workers"] == 1}
    print(table(["set-up", "workers", "wall s", "trials/min (wall)", "trials/min (trials' span)", "vs 1 worker",
                 "median trial s"],
                [[row["setup"], str(row["workers"]), f"{row['wall_s']:.1f}", f"{row['per_min_wall']:.1f}",
                  f"{row['per_min_span']:.1f}",
                  f"{row['per_min_span'] / one[row['setup']]['per_min_span']:.2f}x" if row["setup"] in one else "-",
                  f"{row['median_trial_s']:.2f}"] for row in rows]))
    if "sqlite" in one and "postgres+http" in one:
        sqlite, remote = one["sqlite"], one["postgres+http"]
        print(f"\n1 worker, postgres+http against sqlite: median trial {remote['median_trial_s']:.2f} s against "
              f"{sqlite['median_trial_s']:.2f} s ({remote['median_trial_s'] / sqlite['median_trial_s']:.2f}x)")
    for setup, ms in overhead.items():
        share = f"; {ms / 1000 / one[setup]['median_trial_s']:.3f} of its median trial" if setup in one else ""
        print(f"one trial's MLflow calls, {setup}: {ms:.1f} ms (median of {args.calls}){share}")
    if len(overhead) == 2:
        print(f"tracking over HTTP against SQLite: {overhead['postgres+http'] / overhead['sqlite']:.2f}x")
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
