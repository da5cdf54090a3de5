"""Shared fixtures: temporary MLflow/Optuna stores and small image folders made by the tests.

Every test runs against a real SQLite tracking store in a temporary folder (never the user's
``mlruns/``), and nothing calls the network.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from helpers import CLASSES, make_image

# Under pytest-xdist (make test runs two workers): the cores are shared between the workers, so
# each worker's processes get their share of threads (torch reads this when it starts) rather
# than every process spinning one thread per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store made once per pytest process: MLflow's schema migrations take
    about a second per new database, and every test gets its own copy of this one instead."""
    import mlflow

    from scenesweep.tracking.mlflow_store import setup_tracking

    folder = tmp_path_factory.mktemp("store_template")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        setup_tracking()
    mlflow.set_tracking_uri(None)
    return folder / "mlflow.db"


def copy_store(template: Path, folder: Path) -> None:
    """A new store in ``folder`` from the template, its Default experiment's artifacts beside it
    (as the store plugin would put them for a new database)."""
    import shutil
    import sqlite3

    shutil.copyfile(template, folder / "mlflow.db")
    with sqlite3.connect(folder / "mlflow.db") as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           ((folder / "artifacts" / "0").resolve().as_uri(),))


# Each phase's outcome, on the test: a passed test's store is removed at its teardown.
PHASES_PASSED = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.stash.setdefault(PHASES_PASSED, {})[report.when] = report.passed
    return report


@pytest.fixture(autouse=True)
def _isolated_environment(request, tmp_path_factory, monkeypatch, _store_template):
    """No test touches the user's store, cache, or the network; each test gets its own store.

    A passed test's store and TORCH_HOME are removed when it ends, as its ``tmp_path`` is
    (``tmp_path_retention_policy = "failed"``): the suite writes about 13 GB of models, weights
    and caches, which a CI machine's disk need not hold at once. A failed test's stay to look at."""
    store = tmp_path_factory.mktemp("store")
    torch_home = tmp_path_factory.mktemp("torch_home")
    copy_store(_store_template, store)
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"  # a real SQLite store in a temporary folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("SCENESWEEP_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    import mlflow

    from scenesweep.tracking.mlflow_store import setup_tracking

    setup_tracking()  # creates the store, with the Default experiment's artifacts beside it
    while mlflow.active_run():
        mlflow.end_run()
    yield store
    if all(request.node.stash.get(PHASES_PASSED, {"call": False}).values()):
        import shutil

        for folder in (store, torch_home):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def store(_isolated_environment) -> Path:
    """The folder of this test's SQLite tracking store."""
    return _isolated_environment


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A feature cache shared by the tests that only need features (digits at 32 px)."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture
def flat_scenes(tmp_path) -> Path:
    """A flat 15-Scene-like folder: root/<class>/*, 3 classes x 14 images, JPEG and PNG,
    grayscale and colour, several sizes."""
    root = tmp_path / "scenes"
    for label, name in enumerate(CLASSES):
        for index in range(14):
            suffix = ".jpg" if index % 2 else ".png"
            mode = "RGB" if index % 3 == 0 else "L"
            make_image(root / name / f"{name}_{index:02d}{suffix}", label, index, mode,
                       size=(40 + 4 * (index % 3), 36 + 2 * (index % 4)))
    return root


@dataclasses.dataclass
class TinyStudy:
    """A study ``tiny_study`` ran: its file, its validated spec, and the driver's answer
    (``runs.study_outcome.StudyOutcome``)."""

    path: Path
    spec: object
    outcome: object


@pytest.fixture
def tiny_study(flat_scenes, tmp_path):
    """``tiny_study(**keys)``: a small study on the test's images (``sweep_helpers.study_file``:
    keys such as ``study``, ``tunes``, ``fixed``, ``space``, ``n_trials``), run in this process
    by the sweep driver, as ``scenesweep sweep`` runs it (``runs.sweep.run_study``), without a
    new interpreter's imports. ``run_options`` go to run_study (``n_trials``, ``register``)."""
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study
    from sweep_helpers import study_file

    def run(run_options: dict | None = None, **keys) -> TinyStudy:
        path = study_file(tmp_path, flat_scenes, **keys)
        spec = load_study(path)
        return TinyStudy(path, spec, run_study(spec, progress=False, **(run_options or {})))

    return run


@pytest.fixture
def split_scenes(tmp_path) -> Path:
    """A root/train/<class>/* + root/test/<class>/* folder: 3 classes, 10 train and 4 test each."""
    root = tmp_path / "split_scenes"
    for label, name in enumerate(CLASSES):
        for index in range(14):
            part = "train" if index < 10 else "test"
            make_image(root / part / name / f"{index:02d}.png", label, index)
    return root


# The slowest files first: xdist (``--dist loadfile``) hands a whole file to an idle worker in
# collection order, and a long file that starts last keeps the other worker idle at the end.
# The order is each file's measured test time, longest first (``benchmarks/suite_cost.py`` on
# the 2-core Zen 3, 2026-12-07: sweep workers 285 s, sweeps 191, several machines 166, ...);
# files not named come after, in pytest's order. (Against the previous hand-made order the
# whole suite took the same: 751 s and 749 s, alternated.)
SLOW_FIRST = ("test_sweep_workers", "test_sweeps", "test_several_machines", "test_experiments", "test_searching",
              "test_backbone", "test_single_runs", "test_serve_guard", "test_serving", "test_features",
              "test_study_tracking", "test_browser", "test_registry", "test_services", "test_kill_moments",
              "test_heads", "test_precision", "test_imagenet", "test_bad_input")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The slowest files first (each file keeps its own order)."""
    order = {name: index for index, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(Path(str(item.fspath)).stem, len(order)))


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size_mb)``: a tmpfs of that size mounted under tmp_path for the test and
    unmounted after (CI runs as root; elsewhere the test is skipped)."""
    mounted = []

    def mount(name: str, size_mb: int) -> Path:
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (root is needed): {done.stderr.strip()}")
        mounted.append(mountpoint)
        # The tests fill it: had the mount not taken (a sandbox's mount that reports success),
        # they would fill the disk every other test writes to.
        size = os.statvfs(mountpoint).f_blocks * os.statvfs(mountpoint).f_frsize
        if not os.path.ismount(mountpoint) or size > 2 * size_mb * 2**20:
            pytest.fail(f"{mountpoint}: no {size_mb} MB tmpfs there after mount ({size / 2**20:.0f} MB)")
        return mountpoint

    yield mount
    for mountpoint in mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
