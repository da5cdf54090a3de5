"""Killed at any moment: every step that writes to a store is idempotent on resume.

Each test starts a real ``scenesweep sweep`` process that SIGKILLs itself at one named moment
(``SCENESWEEP_KILL_AT``, ``scenesweep.core.faults``), runs the same command again, and checks
what a user relies on: exactly n_trials complete, the study's own settings all run, one parent
run, one model version with its description and alias, nothing RUNNING, no temporary file left.
"""
import os
import signal
import sys

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from scenesweep.core.faults import KILL_ENV, MOMENTS

from helpers import REPO
from warm_processes import run_process
from sweep_helpers import all_runs, load, sweep, write_study

pytestmark = pytest.mark.slow
OWN = [{"C": 0.5}, {"C": 2.0}, {"C": 8.0}]


def study_file(tmp_path, flat_scenes):
    return write_study(tmp_path, f"""
        study: moments
        experiment: svm
        tunes: svm
        fixed: {{data: "{flat_scenes}", train_per_class: 10, arch: resnet18, layer: pool, cache_dir: "{tmp_path / 'cache'}"}}
        space:
          C: {{type: float, low: 1.0e-3, high: 1.0e2, log: true}}
        sampler: {{name: tpe, seed: 0}}
        n_trials: 4
        enqueue:
          - {{C: 0.5}}
          - {{C: 2.0}}
          - {{C: 8.0}}
        register: scene-classifier
        """)


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_sweep_killed_at_this_moment_resumes_to_one_study_one_parent_one_version(moment, flat_scenes, tmp_path):
    study = study_file(tmp_path, flat_scenes)
    killed = run_process([sys.executable, "-m", "scenesweep", "sweep", str(study), "--no-progress"],
                         cwd=REPO, env={**os.environ, KILL_ENV: moment}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, (moment, killed.returncode, killed.stderr[-3000:])
    resumed = sweep(study)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    trials = load("moments").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(any(t.params == own for t in complete) for own in OWN)  # the reference settings all ran
    assert len({t.params["C"] for t in complete}) == 4  # none ran twice
    runs = all_runs()
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    client = MlflowClient()
    versions = client.search_model_versions("name='scene-classifier'")
    assert len(versions) == 1, [(v.version, v.tags.get("trial_number")) for v in versions]
    assert versions[0].description
    assert str(client.get_registered_model("scene-classifier").aliases["challenger"]) == str(versions[0].version)
    leftovers = [p for p in (tmp_path / "cache").rglob("*.tmp")]
    assert not leftovers, leftovers
    if moment == "trial-run-ended":
        # Its run had finished: recorded with its value, not failed and run again.
        assert not [t for t in trials if t.state == TrialState.FAIL]
