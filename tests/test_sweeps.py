"""Optuna studies tracked in MLflow, against temporary stores: the README's promises for sweeps."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from scenesweep.core.config import run_parameters
from scenesweep.specs.studies import load_study

from helpers import REPO, run_cli
from sweep_helpers import all_runs, load, parents_and_children, study_file, sweep

pytestmark = pytest.mark.slow
STUDY_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_space_key_is_a_parameter_of_what_the_study_tunes(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw["space"]) <= set(run_parameters(raw["tunes"]))
    spec = load_study(path)
    for params in spec.enqueue:
        spec.trial_config(params)  # the study's own points are valid configurations


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


def test_sweep_pooling_extracts_every_pooling_in_one_pass_and_logs_epochs(flat_scenes, tmp_path):
    """The four pooling types differ only after block 1: the first trial's pass fills all four
    conv entries (block 1 run once per batch), the other trials read theirs."""
    result = sweep(REPO / "sweeps" / "pooling.yaml", "--n_trials", "4", "--epochs", "3", "--data", str(flat_scenes),
                   "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-4000:]
    parents, children = parents_and_children()
    assert sorted(c.data.params["pooling"] for c in children) == ["avg", "lp1", "lp2", "max"]
    # The file's description says 40 epochs; the pages say what ran.
    note = parents[0].data.tags["mlflow.note.content"]
    assert "epochs=3 (the file says 40)" in note
    experiment = MlflowClient().get_experiment(parents[0].info.experiment_id)
    assert "epochs=3 (the file says 40)" in experiment.tags["mlflow.note.content"]
    by_number = sorted(children, key=lambda c: int(c.data.tags["trial_number"]))
    assert [c.data.tags["conv_cache"] for c in by_number] == ["miss", "hit", "hit", "hit"]
    assert by_number[0].data.metrics["time/extract_branches"] == 4
    # Each trial's timings say what it did: the others read the cache (and computed their layer),
    # logging that, with the figures of the extraction that filled their entry as tags.
    for hit in by_number[1:]:
        assert not [k for k in hit.data.metrics if k.startswith("time/extract_")]
        assert hit.data.metrics["time/cache_read_s"] >= 0 and hit.data.metrics["time/layer_s"] >= 0
        assert float(hit.data.tags["cache.extraction_images_per_s"]) > 0
    client = MlflowClient()
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")]
        assert sorted(set(steps)) == [1, 2, 3]  # (a registered best trial: its last epoch again, linked to the model)


def test_a_pruned_trial_ends_killed_with_a_pruned_tag(flat_scenes, tmp_path):
    study = study_file(tmp_path, flat_scenes, "prune_me", "mlp", experiment="pooling",
                       fixed={"epochs": 4, "hidden": "64", "dropout": 0.0, "batch_size": 4},
                       space={"lr": {"type": "float", "low": 1.0e-9, "high": 2.0e-9, "log": True}},
                       pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                       enqueue=[{"lr": 0.001}])
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("prune_me").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    _, children = parents_and_children()
    pruned = [c for c in children if c.data.tags["trial_number"] == "1"][0]
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned"].startswith("pruned at epoch")
    # The runs table says why, as the log line does (a red cross alone says nothing).
    assert pruned.info.run_name.endswith(" · " + pruned.data.tags["pruned"].split(":")[0])
    assert pruned.data.tags["failure"] == "pruned"  # what died of what: filterable in the runs table
    assert trials[1].user_attrs["failure"] == "pruned"  # and in Optuna, whose FAIL/PRUNED say less


def test_the_studys_own_settings_run_in_full_and_tuning_trials_as_the_file_declares(flat_scenes, tmp_path):
    """Enqueued settings (the reference study's points) are never pruned and keep the fixed batch
    size; tuning trials run at the file's tuning batch size and are pruned."""
    study = study_file(tmp_path, flat_scenes, "own_and_tuning", "mlp", experiment="pooling",
                       fixed={"epochs": 4, "hidden": "64", "dropout": 0.0, "batch_size": 8},
                       space={"lr": {"type": "float", "low": 1.0e-9, "high": 2.0e-9, "log": True}},
                       pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
                       tuning={"batch_size": 4}, n_trials=4, enqueue=[{"lr": 0.001}, {"lr": 1.0e-9}])
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load("own_and_tuning").trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.COMPLETE]  # the bad one too
    assert TrialState.PRUNED in [t.state for t in trials[2:]]
    _, children = parents_and_children()
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    assert [by_number[n].data.tags["trial_kind"] for n in range(4)] == ["own setting"] * 2 + ["tuning"] * 2
    assert [by_number[n].data.params["batch_size"] for n in range(4)] == ["8", "8", "4", "4"]


def test_the_best_trials_own_head_is_scored_on_test_even_when_it_is_a_tuning_trial(tiny_study, tmp_path):
    """No head trained twice: the summary scores the head the best trial fitted (here a tuning
    trial at its own batch size), and only refits, at that trial's settings, when it is gone."""
    from scenesweep.compute.training import evaluate_test_split, prepare
    from scenesweep.runs.summary import evaluate_trial
    from scenesweep.search.kept_heads import kept_head

    ran = tiny_study(study="kept_head", tunes="mlp", experiment="pooling",
                     fixed={"epochs": 10, "hidden": "64", "dropout": 0.0, "layer": "pool5", "batch_size": 8},
                     space={"lr": {"type": "float", "low": 0.001, "high": 0.002}},
                     objective={"metric": "val/loss", "direction": "minimize"}, tuning={"batch_size": 4},
                     enqueue=[{"lr": 1.0e-9}])
    spec, outcome = ran.spec, ran.outcome
    best = load("kept_head").best_trial
    # The own setting (lr 1e-9) stays at the uniform guess's loss, ln 3; the tuning trial learns.
    assert best.number == 1 and outcome.best.number == 1, [t.value for t in load("kept_head").trials]
    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["best_head"].startswith("kept") and "best/val/acc_refit" not in parent.data.metrics
    head, why = kept_head(best)
    assert head is not None, why
    assert head.batch_size == 4  # trained at the tuning batch size, as the trial ran
    prepared = prepare(spec.trial_config(best.params, tuning=True), progress=False)
    test, _ = evaluate_test_split(prepared, head)
    assert parent.data.metrics["test/acc"] == pytest.approx(test["test/acc"])
    assert client.get_run(best.user_attrs["mlflow_run_id"]).data.tags["head_kept"] == "true"
    # Only the best trial's head stays in the cache.
    assert [p.name for p in (tmp_path / "cache" / "heads" / outcome.parent_run_id).iterdir()] == ["trial-1.pkl"]
    # Gone (another machine's worker kept it): refitted at the trial's own settings, and said so.
    Path(best.user_attrs["kept_head"]["path"]).unlink()
    refit = evaluate_trial(spec, best, "the best trial", progress=False)
    assert refit.refitted and refit.head.batch_size == 4


def test_a_failing_trial_is_failed_and_the_study_goes_on(flat_scenes, tmp_path):
    missing = str(tmp_path / "missing.pt")
    study = study_file(tmp_path, flat_scenes, "survive", experiment="svm",
                       space={"weights": {"type": "categorical", "choices": ["random", missing]}},
                       enqueue=[{"weights": missing}, {"weights": "random"}])
    result = sweep(study)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [t.state for t in load("survive").trials] == [TrialState.FAIL, TrialState.COMPLETE]
    parents, children = parents_and_children()
    failed = [c for c in children if c.data.tags["trial_number"] == "0"][0]
    assert failed.info.status == "FAILED" and "missing.pt" in failed.data.tags["error"]
    assert failed.data.tags["failure"] == "error"
    assert load("survive").trials[0].user_attrs["failure"] == "error"
    assert parents[0].data.tags["best_trial"] == "1"


def test_a_study_name_given_on_the_command_line_tags_every_trial(flat_scenes, tmp_path):
    result = sweep(REPO / "sweeps" / "svm_c.yaml", "--n_trials", "2", "--study_name", "my_study",
                   "--data", str(flat_scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"),
                   "--no-register")
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = parents_and_children()
    assert {c.data.tags["study"] for c in children} == {"my_study"}
    assert {c.data.tags["optuna.storage_study"] for c in children} == {"my_study"}
    assert parents[0].data.tags["study"] == "my_study"
    # The runs table tells two studies apart, and shows each trial's objective and the best one.
    best = max(c.data.metrics["val/acc"] for c in children)
    assert parents[0].info.run_name == f"my_study study · best val/acc {best:.4f}"
    assert all(c.info.run_name.startswith("my_study #") and " · val/acc " in c.info.run_name for c in children)
    assert [c.info.run_name.endswith(" · best") for c in children].count(True) == 1


def test_a_piped_sweep_writes_a_log_a_person_can_read(flat_scenes, tmp_path, monkeypatch):
    """stderr not a terminal (CI, `make demo > log`): no carriage returns, one line per trial
    (number, params, objective, seconds), one per stage (the extraction, the test evaluation)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    from helpers import run_cli

    result = run_cli("sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--n_trials", "3", "--data", str(flat_scenes),
                     "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and len(lines) < 12, result.stderr
    trial_lines = [line for line in lines if line.startswith("trial #")]
    assert len(trial_lines) == 3 and all(" val/acc " in line and " s (best " in line for line in trial_lines)
    assert trial_lines[0].startswith("trial #0 C=1 layer=relu7: val/acc ")  # the study's own setting first
    assert len([line for line in lines if line.startswith("extract vgg16/")]) == 1
    assert len([line for line in lines if line.startswith("test evaluation of the best trial #")]) == 1


def test_a_study_where_every_trial_fails_exits_non_zero(flat_scenes, tmp_path):
    study = study_file(tmp_path, flat_scenes, "doomed",
                       space={"weights": {"type": "categorical", "choices": [str(tmp_path / "a.pt"),
                                                                             str(tmp_path / "b.pt")]}})
    result = sweep(study)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no trial of study 'doomed' completed" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    parents, children = parents_and_children()
    assert parents[0].info.status == "FAILED" and "no trial" in parents[0].data.tags["error"]
    assert {c.info.status for c in children} == {"FAILED"}
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


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




def test_a_study_on_a_warm_cache_builds_no_network_after_its_first_trial(flat_scenes, tiny_study, tmp_path,
                                                                         monkeypatch):
    """Resolved once: with its features cached by another process, a 4-trial svm study builds no
    torchvision network in trials 2-4, not even a copy on the meta device (parameter counts,
    stored bytes and layer tables read one shared structure per setting)."""
    import torchvision

    keys = dict(study="warm", fixed={"image_size": 32, "precision": "fp32"}, n_trials=4,
                space={"C": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
                       "layer": {"type": "categorical", "choices": ["fc7", "relu7"]}},
                enqueue=[{"C": 1.0, "layer": "fc7"}, {"C": 1.0, "layer": "relu7"}])
    # Another process fills the cache with both layers' features.
    filled = run_cli("sweep", str(study_file(tmp_path, flat_scenes, **keys)), "--n_trials", "2", "--study_name", "fill",
                     "--no-progress", process=True)
    assert filled.returncode == 0, filled.stderr[-3000:]
    built = []
    original = torchvision.models.VGG.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torchvision.models.VGG, "__init__", counting_init)
    tiny_study(run_options={"n_trials": 1, "register": False}, **keys)
    assert load("warm").trials[0].state == TrialState.COMPLETE  # the second setting waits in the queue
    during_first = len(built)
    tiny_study(run_options={"n_trials": 4, "register": False}, **keys)  # resumes: trials 2-4, another layer first
    assert [t.state for t in load("warm").trials] == [TrialState.COMPLETE] * 4
    assert len(built) == during_first, f"{len(built) - during_first} networks built in trials 2-4"
    assert during_first <= 1  # the first trial: at most the shared structure (the features are cached)
