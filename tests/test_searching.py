"""Searching (the README's "Searching" section): every Optuna sampler and pruner a study file can
name, several objectives and their Pareto front, constraints, the selection rule, ``register
--trial``, warm starts from earlier runs, and the refusals, against temporary stores.

Tiny studies: ResNet-18's pooled features (the smallest trunk) or VGG16's, on 42 generated images
at 32 px, the feature cache shared by every test of this file's worker.
"""
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from scenesweep.specs.studies import SAMPLERS

from helpers import REPO, assert_clear_error, invoke
from warm_processes import WarmPopen
from sweep_helpers import load, parents_and_children, study_file, sweep

pytestmark = pytest.mark.slow

C_SPACE = {"C": {"type": "float", "low": 1.0e-3, "high": 1.0e2, "log": True}}
GRID_SPACE = {"C": {"type": "float", "values": [0.01, 1.0, 100.0]}, "layer": {"type": "categorical",
                                                                           "choices": ["layer4", "pool"]}}


def searching_study(tmp_path, data, cache, name="tiny", fixed=None, **fields):
    """A study file of a few trials (``sweep_helpers.study_file``): the svm head on ResNet-18's
    pooled features, TPE seeded, 3 trials, unless ``fields`` say otherwise (``fixed`` is merged; a
    key set to None or searched by the space is left out of it)."""
    return study_file(tmp_path, data, study=name, cache=cache, experiment="searching",
                      fixed={"arch": "resnet18", "layer": "pool", **(fixed or {})},
                      **{"space": C_SPACE, "sampler": {"name": "tpe", "seed": 0}, "n_trials": 3, **fields})


@pytest.fixture
def cache(shared_cache):
    return shared_cache / "searching"


def trial_runs(study_name):
    _, children = parents_and_children()
    return {int(c.data.tags["trial_number"]): c for c in children if c.data.tags.get("study") == study_name}


def parent_of(study_name):
    parents, _ = parents_and_children()
    return next(p for p in parents if p.data.tags["study"] == study_name)


# --------------------------------------------------------------------------------------------
# Every sampler and pruner, end to end
# --------------------------------------------------------------------------------------------

def _sampler_study(name):
    """A study each sampler can run: a grid for grid/bruteforce, two objectives for NSGA."""
    if name == "grid":
        return {"space": GRID_SPACE, "n_trials": None}
    if name == "bruteforce":
        return {"space": {"C": {"type": "float", "low": 0.5, "high": 1.5, "step": 0.5},
                          "layer": {"type": "categorical", "choices": ["layer4", "pool"]}}, "n_trials": None}
    if name in ("nsgaii", "nsgaiii"):
        return {"objectives": [{"metric": "val/acc"}, {"metric": "model/size_mb"}],
                "space": {**C_SPACE, "layer": {"type": "categorical", "choices": ["layer4", "pool"]}},
                "sampler": {"name": name, "seed": 0, "population_size": 2}}
    return {"sampler": {"name": name, "seed": 0, **({"n_startup_trials": 1} if name in ("gp", "tpe") else {})}}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_a_study_end_to_end(name, flat_scenes, tmp_path, cache):
    fields = _sampler_study(name)
    fields.setdefault("sampler", {"name": name, "seed": 0})
    path = searching_study(tmp_path, flat_scenes, cache, name=f"s_{name}", **fields)
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(f"s_{name}")
    expected = 6 if name in ("grid", "bruteforce") else 3  # a grid's size when n_trials is not given
    assert len(study.trials) == expected and all(t.state == TrialState.COMPLETE for t in study.trials)
    if name in ("grid", "bruteforce"):  # every point once
        assert len({(t.params["C"], t.params["layer"]) for t in study.trials}) == 6
    parent = parent_of(f"s_{name}")
    assert parent.info.status == "FINISHED" and parent.data.params["sampler"] == name
    assert len(trial_runs(f"s_{name}")) == expected


@pytest.mark.parametrize("name, pruner, head", [
    ("percentile", {"name": "percentile", "percentile": 90.0, "n_startup_trials": 1}, "mlp"),
    ("patient", {"name": "patient", "patience": 0, "wrapped_pruner": {"name": "median", "n_startup_trials": 1}},
     "mlp-diverging"),
    ("threshold", {"name": "threshold", "lower": 0.99}, "mlp"),
    ("wilcoxon", {"name": "wilcoxon", "p_threshold": 0.5, "n_startup_steps": 1}, "svm"),
])
def test_every_pruner_prunes_a_hopeless_trial(name, pruner, head, flat_scenes, tmp_path, cache):
    """The study's own setting runs in full; the tuning trial after it (a learning rate or C that
    learns nothing) is pruned, its run KILLED and named so."""
    if head == "mlp-diverging":  # PatientPruner stops a trial that got worse (here its loss, lr 5 with Adam)
        fields = {"tunes": "mlp", "objective": {"metric": "val/loss"},
                  "fixed": {"epochs": 6, "hidden": "16", "dropout": 0.0, "batch_size": 8},
                  "space": {"lr": {"type": "float", "low": 5.0, "high": 6.0}}, "enqueue": [{"lr": 0.01}]}
    elif head == "mlp":
        fields = {"tunes": "mlp", "fixed": {"epochs": 3, "hidden": "16", "dropout": 0.0, "batch_size": 8},
                  "space": {"lr": {"type": "float", "low": 1.0e-9, "high": 2.0e-9, "log": True}},
                  "enqueue": [{"lr": 0.01}]}
    else:  # per-fold results: each fold a step (the hinge loss: these stripes are separable at any C)
        fields = {"validation": {"folds": 5}, "objective": {"metric": "val/loss"}, "space": {"C": {"type": "float", "low": 1.0e-9, "high": 2.0e-9,
                                                              "log": True}},
                  "fixed": {"normalize": True}, "enqueue": [{"C": 1.0}]}
    path = searching_study(tmp_path, flat_scenes, cache, name=f"p_{name}", pruner=pruner, n_trials=2,
                      sampler={"name": "random", "seed": 0}, **fields)
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(f"p_{name}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED], \
        [(t.state, t.intermediate_values) for t in trials]
    if name == "wilcoxon":
        assert sorted(trials[0].intermediate_values) == [1, 2, 3, 4, 5]  # one report per fold
    runs = trial_runs(f"p_{name}")
    assert runs[1].info.status == "KILLED" and runs[1].data.tags["failure"] == "pruned"


def test_folds_select_on_the_mean_of_stratified_folds(flat_scenes, tmp_path, cache):
    path = searching_study(tmp_path, flat_scenes, cache, name="folds", validation={"folds": 4}, n_trials=2,
                      register="scene-classifier")
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = trial_runs("folds")[0]
    client = MlflowClient()
    per_fold = [m.value for m in client.get_metric_history(run.info.run_id, "fold/val/acc")]
    assert len(per_fold) == 4
    assert run.data.metrics["val/acc"] == pytest.approx(sum(per_fold) / 4)
    # The registered model record carries the folds' validation figure, not its own head's on data it saw.
    version = client.get_model_version("scene-classifier", "1")
    record = mlflow.get_logged_model(version.tags["model_id"])
    best = load("folds").best_trial
    assert record.metrics and {m.key: m.value for m in record.metrics}["val/acc"] == pytest.approx(best.value)


# --------------------------------------------------------------------------------------------
# Several workers on one storage
# --------------------------------------------------------------------------------------------

def _workers(count, path):
    command = [sys.executable, "-m", "scenesweep", "sweep", str(path), "--no-progress"]
    workers = [WarmPopen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    return outputs


def test_two_workers_run_exactly_the_grid(flat_scenes, tmp_path, cache):
    path = searching_study(tmp_path, flat_scenes, cache, name="grid2", space=GRID_SPACE, sampler={"name": "grid"}, n_trials=None,
                      register="scene-classifier")
    outputs = _workers(2, path)
    trials = load("grid2").trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {(t.params["C"], t.params["layer"]) for t in trials} == {
        (c, layer) for c in (0.01, 1.0, 100.0) for layer in ("layer4", "pool")}
    parents, children = parents_and_children()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 6
    assert {c.info.status for c in children} == {"FINISHED"}
    assert sum("best trial #" in out for out, _ in outputs) == 1
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='scene-classifier'")] == ["1"]


def test_two_workers_share_a_gp_study_exactly(flat_scenes, tmp_path, cache):
    """Exactly n_trials, one parent, nothing RUNNING, one version. (Not distinct points: GPSampler
    has no constant liar, so two workers asking with the same history may both pick the same
    boundary point, C=1e-3 in one run here.)"""
    path = searching_study(tmp_path, flat_scenes, cache, name="gp2", n_trials=4, register="scene-classifier",
                      sampler={"name": "gp", "seed": 0, "n_startup_trials": 2})
    outputs = _workers(2, path)
    trials = load("gp2").trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    parents, children = parents_and_children()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags[MLFLOW_PARENT_RUN_ID] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert sum("best trial #" in out for out, _ in outputs) == 1
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='scene-classifier'")] == ["1"]


# --------------------------------------------------------------------------------------------
# Several objectives, constraints, the selection rule, register --trial
# --------------------------------------------------------------------------------------------

VGG_LAYERS = {"arch": "vgg16", "layer": None}


def test_a_pareto_front_is_logged_selected_from_and_any_of_it_registered(flat_scenes, tmp_path, cache):
    """val/acc against model size over VGG16's layers (pool5: 60 MB, relu7: 538 MB): the front
    on the parent (csv, plot, one chart series per objective), its runs tagged and named, the
    rule's pick registered; another front trial registered later by ``register --trial``."""
    path = searching_study(tmp_path, flat_scenes, cache, name="front", fixed=VGG_LAYERS, n_trials=6,
                      space={"C": {"type": "float", "values": [0.01, 100.0]},
                             "layer": {"type": "categorical", "choices": ["pool5", "relu7", "fc6"]}},
                      objectives=[{"metric": "val/acc", "direction": "maximize"},
                                  {"metric": "model/size_mb", "direction": "minimize"}],
                      select={"metric": "val/acc", "where": "metrics.`model/size_mb` <= 100"},
                      sampler={"name": "grid"}, register="scene-classifier")
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load("front")
    front = {t.number for t in study.best_trials}
    assert front
    parent = parent_of("front")
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"pareto.csv", "plots/optuna_pareto_front.png"} <= artifacts
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/pareto.csv")
    assert len(table.strip().splitlines()) == len(front) + 1
    for metric in ("val/acc", "model/size_mb"):
        series = client.get_metric_history(parent.info.run_id, f"pareto/{metric}")
        assert sorted(m.step for m in series) == list(range(len(front)))
    runs = trial_runs("front")
    for number, run in runs.items():
        assert run.data.tags["pareto"] == ("true" if number in front else "false")
        assert ("· pareto" in run.info.run_name) == (number in front)
        assert "val/acc" in run.info.run_name and "model/size_mb" in run.info.run_name
    # The rule: the best val/acc among the front's models of at most 100 MB (pool5's).
    chosen = int(parent.data.tags["best_trial"])
    assert chosen in front and runs[chosen].data.params["layer"] == "pool5"
    assert runs[chosen].data.metrics["model/size_mb"] <= 100
    version = client.get_model_version("scene-classifier", "1")
    assert version.run_id == runs[chosen].info.run_id
    # The report's "Accuracy against cost" section shows the front, the registered trial marked.
    from scenesweep.report.build import build_report

    report = build_report(tmp_path / "report", log=False).path.read_text()
    cost = report.split("## Accuracy against cost", 1)[1].split("\n## ", 1)[0]
    assert "`front` (**DEMO** figures" in cost and f"**#{chosen}** (registered)" in cost
    assert "figures/pareto_" in cost and list((tmp_path / "report" / "figures").glob("pareto_*.png"))
    # Another Pareto-optimal trial, registered by choice: its own record and metrics.
    others = sorted((n for n in front if n != chosen), key=lambda n: runs[n].data.metrics["model/size_mb"])
    if others:
        registered = invoke("register", "--study", "front", "--trial", str(others[0]))
        assert registered.returncode == 0, registered.stderr[-3000:]
        assert "version 2" in registered.stdout
        second = client.get_model_version("scene-classifier", "2")
        assert second.run_id == runs[others[0]].info.run_id
        record = mlflow.get_logged_model(second.tags["model_id"])
        assert {m.key: m.value for m in record.metrics}["val/acc"] == pytest.approx(
            runs[others[0]].data.metrics["val/acc"])


def test_an_infeasible_trial_is_never_best_nor_registered(flat_scenes, tmp_path, cache):
    """relu7 (538 MB) breaks 'model/size_mb <= 100' however well it does: tagged, named, left out."""
    path = searching_study(tmp_path, flat_scenes, cache, name="constrained", fixed=VGG_LAYERS, n_trials=2,
                      space={"layer": {"type": "categorical", "choices": ["relu7", "pool5"]}},
                      enqueue=[{"layer": "relu7"}, {"layer": "pool5"}], constraints=["model/size_mb <= 100"],
                      register="scene-classifier")
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = trial_runs("constrained")
    assert runs[0].data.tags["feasible"] == "false" and runs[0].info.run_name.endswith("· infeasible")
    assert "(infeasible: model/size_mb <= 100)" in result.stderr
    assert runs[1].data.tags["feasible"] == "true" and runs[1].data.tags["best_trial"] == "true"
    assert runs[0].data.tags.get("best_trial") != "true"
    assert load("constrained").best_trial.number == 1
    version = MlflowClient().get_model_version("scene-classifier", "1")
    assert version.run_id == runs[1].info.run_id
    # A trial's model/size_mb is what its registered model takes (within 1 %).
    record = mlflow.get_logged_model(version.tags["model_id"])
    registered_mb = {m.key: m.value for m in record.metrics}["model/size_mb"]
    assert runs[1].data.metrics["model/size_mb"] == pytest.approx(registered_mb, rel=0.01)
    refused = invoke("register", "--study", "constrained", "--trial", "0")
    assert_clear_error(refused, "--trial 0", "constraints", "never registered")


def test_a_prediction_time_objective_is_measured_once_per_backbone_and_kept(flat_scenes, tmp_path, cache):
    path = searching_study(tmp_path, flat_scenes, cache, name="timed", n_trials=2,
                      objectives=[{"metric": "val/acc"}, {"metric": "time/predict_ms_per_image"}])
    result = sweep(path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = trial_runs("timed")
    assert all(run.data.metrics["time/predict_ms_per_image"] > 0 for run in runs.values())
    assert len(list((cache / "predict_cost").glob("*.json"))) >= 1


# --------------------------------------------------------------------------------------------
# Warm starts
# --------------------------------------------------------------------------------------------

def test_warm_start_adds_earlier_results_or_runs_their_parameters_again(flat_scenes, tmp_path, cache):
    first = searching_study(tmp_path, flat_scenes, cache, name="earlier", n_trials=3)
    assert sweep(first).returncode == 0
    earlier = trial_runs("earlier")
    # results: the earlier trials join with their values; they do not spend the new study's budget.
    results = searching_study(tmp_path, flat_scenes, cache, name="later", n_trials=2,
                         warm_start={"study": "earlier", "as": "results"})
    done = sweep(results)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warm start: 3 earlier trials of 'earlier' added with their results" in done.stderr
    trials = load("later").trials
    warm = [t for t in trials if "warm_start.source_run_id" in t.user_attrs]
    assert len(warm) == 3 and len(trials) == 5
    assert {t.user_attrs["warm_start.source_run_id"] for t in warm} == {r.info.run_id for r in earlier.values()}
    assert {t.value for t in warm} == {r.data.metrics["val/acc"] for r in earlier.values()}
    assert parent_of("later").data.tags["warm_start.count"] == "3"
    assert len(trial_runs("later")) == 2
    # enqueue: the best two earlier parameter sets run first, here.
    again = searching_study(tmp_path, flat_scenes, cache, name="again", n_trials=3,
                       warm_start={"experiment": "searching", "where": "tags.study = 'earlier'", "as": "enqueue",
                                   "max": 2})
    done = sweep(again)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = trial_runs("again")
    sources = {earlier[n].info.run_id: earlier[n] for n in earlier}
    for number in (0, 1):
        source = sources[runs[number].data.tags["warm_start.source_run_id"]]
        assert runs[number].data.params["C"] == source.data.params["C"]
    assert "warm_start.source_run_id" not in runs[2].data.tags
    # Results measured under another setting are refused, naming the keys.
    other = searching_study(tmp_path, flat_scenes, cache, name="other", fixed={"image_size": 48},
                       warm_start={"study": "earlier"})
    assert_clear_error(sweep(other), "warm_start", "image_size: 32 -> 48", "as: enqueue")


# --------------------------------------------------------------------------------------------
# Refused before any trial
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, fragments", [
    ({"sampler": {"name": "grid"}}, ["space.C", "sampler grid", "values"]),
    ({"sampler": {"name": "cmaes"}, "objectives": [{"metric": "val/acc"}, {"metric": "model/size_mb"}]},
     ["sampler cmaes optimises one objective"]),
    ({"sampler": {"name": "cmaes"}, "space": {"layer": {"type": "categorical", "choices": ["layer4", "pool"]}}},
     ["sampler cmaes", "categorical"]),
    ({"objective": {"metric": "test/acc"}}, ["objective.metric='test/acc'", "val/acc", "model/size_mb"]),
    ({"objectives": [{"metric": "val/acc"}, {"metric": "latency"}]}, ["objectives[1].metric='latency'"]),
    ({"constraints": ["model/size_mb is small"]}, ["constraints[0]", "METRIC <= NUMBER"]),
    ({"objectives": [{"metric": "val/acc"}, {"metric": "model/size_mb"}], "select": {"where": "metrics.x <<= 3"}},
     ["select.where", "not a filter MLflow reads"]),
    ({"select": {"metric": "val/acc"}}, ["select: picks", "constraints"]),
    ({"pruner": {"name": "wilcoxon"}}, ["pruner wilcoxon", "validation: {folds: K}"]),
    ({"pruner": {"name": "percentile"}}, ["percentile"]),
    ({"tunes": "mlp", "space": {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2}}, "validation": {"folds": 3}},
     ["validation.folds", "svm"]),
    ({"validation": {"folds": 11}}, ["validation.folds=11", "coast", "folds <= 10"]),
    ({"warm_start": {"experiment": "nowhere"}}, ["warm_start.experiment='nowhere'", "no such MLflow experiment"]),
    ({"warm_start": {"study": "never-ran"}}, ["warm_start (study 'never-ran')", "no FINISHED trial run"]),
], ids=["grid-float-range", "cmaes-two-objectives", "cmaes-categorical", "test-metric", "unknown-metric",
        "constraint", "where", "select-one-objective", "wilcoxon-no-folds", "percentile-missing", "folds-mlp", "folds-too-many",
        "warm-no-experiment", "warm-no-runs"])
def test_a_study_that_cannot_run_is_refused_before_any_trial(fields, fragments, flat_scenes, tmp_path, cache):
    path = searching_study(tmp_path, flat_scenes, cache, name="refused", **fields)
    assert_clear_error(sweep(path), *fragments)
    assert not [r for r in parents_and_children()[1] if r.data.tags.get("study") == "refused"]


def test_a_worse_study_says_challenger_stays_where_it_is(flat_scenes, tmp_path, cache):
    """Two studies registering to one model: the second's best is worse on the objective (its
    hinge loss, C=1e-9), so @challenger stays on version 1, and the sweep's last line says so."""
    common = dict(objective={"metric": "val/loss"}, n_trials=1, register="scene-classifier",
                  space={"C": {"type": "float", "low": 1.0e-9, "high": 10.0, "log": True}})
    first = sweep(searching_study(tmp_path, flat_scenes, cache, name="good", enqueue=[{"C": 1.0}], **common))
    assert "registered scene-classifier version 1 (alias @challenger)" in first.stdout
    second = sweep(searching_study(tmp_path, flat_scenes, cache, name="worse", enqueue=[{"C": 1.0e-9}], **common))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "note: @challenger stays on version 1" in second.stderr
    assert "registered scene-classifier version 2 (@challenger stays on version 1)" in second.stdout
    assert str(MlflowClient().get_registered_model("scene-classifier").aliases["challenger"]) == "1"


def test_a_progress_line_never_reports_an_older_best_than_the_trial_lines(flat_scenes, tmp_path, cache,
                                                                         monkeypatch):
    """Off a terminal every progress line (here one per trial but the last) comes after its
    trial's line and reports the best so far including that trial (it reported the one before)."""
    import re

    monkeypatch.setenv("SCENESWEEP_LOG_EVERY", "0")
    monkeypatch.delenv("TQDM_DISABLE")  # the suite's quiet default
    path = searching_study(tmp_path, flat_scenes, cache, name="progress", n_trials=3, objective={"metric": "val/loss"},
                      enqueue=[{"C": 1.0e-3}, {"C": 10.0}])
    result = invoke("sweep", str(path))  # progress shown: stderr is not a terminal here
    assert result.returncode == 0, result.stderr[-3000:]
    best = None
    checked = 0
    for line in result.stderr.splitlines():
        trial = re.match(r"trial #\d+ .*\(best ([0-9.]+), #\d+\)$", line)
        if trial:
            best = trial.group(1)
        shown = re.search(r"(\d)/3 trial.*best val/loss=([0-9.]+)", line)
        if shown:
            assert best is not None and shown.group(2) == best, (line, best)
            checked += 1
    assert checked == 2, result.stderr[-3000:]  # after trials #0 and #1 (the last count closes the bar)
