"""Every experiment file run once at demo size into one shared store, for test_experiments (its
experiment and report tests; a helper module, not a conftest fixture: it runs once per pytest
process).

The demo is shrunk further for the tests: the 3-class image folder of conftest instead of the
digits, 10 training images per class, the files' own demo budgets (few trials, few epochs).
The default file of the MLproject entry point ``experiment`` runs through ``mlflow run``; the
others in-process through the CLI (the same code path, without a new interpreter each).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from helpers import CLASSES, REPO, make_image, run_mlflow_project

EXPERIMENT_FILES = sorted((REPO / "experiments").glob("*.yaml"))
MLPROJECT_DEFAULT = REPO / "experiments" / "q8_svm_relu7.yaml"  # the entry point's default file


@dataclasses.dataclass
class DemoRuns:
    """The shared store: its folder, the data and cache the runs used, and each run's output."""

    store: Path
    data: Path
    cache: Path
    outputs: dict[str, str]

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.store / 'mlflow.db'}"

    def use(self, monkeypatch) -> None:
        """Point this test (and the processes it starts) at the shared store."""
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.uri)
        mlflow.set_tracking_uri(self.uri)


_RUNS: DemoRuns | None = None


def small_scenes(root: Path) -> Path:
    """3 classes x 14 small images, as conftest's flat_scenes."""
    for label, name in enumerate(CLASSES):
        for index in range(14):
            make_image(root / name / f"{name}_{index:02d}.png", label, index, "RGB" if index % 3 == 0 else "L",
                       size=(40 + 4 * (index % 3), 36 + 2 * (index % 4)))
    return root


def shrink_args(data: Path, cache: Path) -> list[str]:
    return ["--data", str(data), "--train_per_class", "10", "--cache_dir", str(cache), "--no-progress"]


def demo_runs(tmp_path_factory) -> DemoRuns:
    """Run every experiment file at demo size once (per pytest process) into a shared store."""
    global _RUNS
    if _RUNS is not None:
        return _RUNS
    from scenesweep.cli.main import main

    root = tmp_path_factory.mktemp("demo_runs")
    runs = DemoRuns(store=root / "store", data=small_scenes(root / "scenes"), cache=root / "cache", outputs={})
    runs.store.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        runs.use(patch)
        for path in EXPERIMENT_FILES:
            if path == MLPROJECT_DEFAULT:
                # mlflow run passes undeclared -P parameters on as --name value.
                result = run_mlflow_project("experiment", {"demo": "true", "data": runs.data, "train_per_class": 10,
                                                           "cache_dir": runs.cache})
                assert result.returncode == 0, result.stderr[-4000:]
                runs.outputs[path.stem] = result.stdout + result.stderr
                continue
            result = CliRunner().invoke(main, ["run", str(path), "--demo", *shrink_args(runs.data, runs.cache)])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            assert result.exit_code == 0, (path.name, result.output[-4000:])
            runs.outputs[path.stem] = result.output
        assert os.environ["MLFLOW_TRACKING_URI"] == runs.uri
    _RUNS = runs
    return runs
