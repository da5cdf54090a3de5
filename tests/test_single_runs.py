"""Each entry point end to end against a temporary SQLite store: what `mlflow ui` will show."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from helpers import REPO, run_cli, run_mlflow_project

pytestmark = pytest.mark.slow


def only_run(experiment: str | None = None):
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact_paths(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_mlflow_run_svm_logs_everything_a_user_compares(store, tmp_path):
    result = run_mlflow_project("svm", {"C": 0.5, "cache_dir": tmp_path / "cache", "layer": "relu7"})
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "svm relu7 C=0.5"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["C"] == "0.5" and params["layer"] == "relu7" and params["data"] == "digits"
    for name in ("dataset_fingerprint", "split_fingerprint", "cache_key", "seed", "val_fraction", "weights"):
        assert params[name]
    for name in ("train/acc", "val/acc", "test/acc", "train/loss", "val/loss", "test/loss",
                 "time/extract_batch_mean_s", "time/extract_batch_median_s", "time/extract_batch_p95_s",
                 "time/extract_images_per_s", "time/train_fit_s"):
        assert name in metrics, name
    assert metrics["test/acc"] > 0.7
    assert tags["cache"] == "miss" and tags["hardware.cpu"] and tags["hardware.torch"] == "2.14.1"
    # Enough to tell two machines of one brand apart: model, the flags that decide speed, torch's view.
    for name in ("cpu_vendor", "cpu_family", "cpu_model", "cpu_flags", "cpu_amx", "cpu_capability"):
        assert tags[f"hardware.{name}"], name
    assert params["resolved.precision"] in ("fp32", "bf16") and params["precision_reason"]
    assert any(k.startswith("system/") for k in metrics), "system metrics are on"
    files = artifact_paths(client, run.info.run_id)
    for expected in ("config.yaml", "dataset/manifest.json", "layer_table.md", "plots/confusion_matrix.png"):
        assert expected in files, (expected, files)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id='{run.info.run_id}'")
    assert [m.name for m in logged] == ["head"]
    assert tags["model.head_uri"] == f"models:/{logged[0].model_id}"
    manifest = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="dataset/manifest.json", dst_path=str(tmp_path))).read())
    assert manifest["fingerprint"] == params["dataset_fingerprint"]
    assert {i["split"] for i in manifest["images"]} == {"train", "val", "test"}
    requirements = open(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{logged[0].artifact_location}/requirements.txt", dst_path=str(tmp_path))).read()
    assert "scikit-learn==" in requirements and "torch==2.14.1" in requirements
    # The splits as MLflow datasets (the runs table's Dataset column): train / validation / test.
    inputs = {next(t.value for t in i.tags if t.key == MLFLOW_DATASET_CONTEXT): i.dataset
              for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    for context, part in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = inputs[context]
        assert dataset.name == "digits" and dataset.digest.startswith(params["dataset_fingerprint"][:8] + "-")
        assert json.loads(dataset.source)["uri"] == manifest["root"]
        assert json.loads(dataset.profile)["images"] == sum(i["split"] == part for i in manifest["images"]) > 0
    # Per-class results of the test evaluation, beside the confusion matrix.
    assert "per_class.json" in files and "confusion_matrix.json" in files
    table = client.load_table(run.info.experiment_id, "per_class.json", run_ids=[run.info.run_id])
    assert list(table["class"]) == [f"digit_{d}" for d in range(10)]
    assert set(table.columns) >= {"precision", "recall", "f1", "support"}
    assert table["support"].sum() == int(params["n_test"])
    assert metrics["test/f1_macro"] == pytest.approx(table["f1"].mean())
    assert metrics["test/acc_balanced"] == pytest.approx(table["recall"].mean())
    assert abs(metrics["test/acc_balanced"] - metrics["test/acc"]) < 0.05  # the digits are balanced
    # The logged head loads back and predicts like the fitted one.
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/head")
    example = np.random.default_rng(0).random((3, 4096), dtype=np.float32)
    assert list(model.predict(example)["label"]) and model.metadata.signature is not None


def test_finetune_logs_every_epoch_as_a_step(store, shared_cache):
    result = run_cli("finetune", "--epochs", "3", "--hidden", "64", "--cache_dir", str(shared_cache),
                     "--no-progress", "--register", "scene-classifier")
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run()
    # Its registered model's record: the run's params, its final metrics whatever their step.
    version = client.get_model_version("scene-classifier", "1")
    record = client.get_logged_model(version.tags["model_id"])
    assert record.source_run_id == run.info.run_id == version.run_id and record.name == "scene-classifier-mlp-pool5"
    assert record.params["hidden"] == "64" and record.params["epochs"] == "3"
    linked = {m.key: m.value for m in record.metrics}
    assert {"val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro", "test/acc_balanced"} <= set(linked)
    assert linked["test/acc"] == pytest.approx(run.data.metrics["test/acc"])
    assert not [k for k in linked if k.startswith("system/")]
    assert run.info.status == "FINISHED"
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        history = client.get_metric_history(run.info.run_id, name)
        # (val/* once more at the last epoch, linked to the registered model's record)
        assert sorted({m.step for m in history}) == [1, 2, 3], name
    assert run.data.params["layer"] == "pool5" and run.data.params["hidden"] == "64"
    assert "time/train_batch_p95_s" in run.data.metrics and "test/acc" in run.data.metrics
    files = artifact_paths(client, run.info.run_id)
    assert "plots/curves.png" in files and "plots/confusion_matrix.png" in files
    assert run.data.tags["model.head_uri"].startswith("models:/")


def test_extract_then_svm_hits_the_cache(store, tmp_path):
    cache = str(tmp_path / "cache")
    first = run_cli("extract", "--cache_dir", cache, "--layer", "pool5", "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("svm", "--cache_dir", cache, "--layer", "pool5", "--C", "0.1", "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    runs = {r.data.tags["entry_point"]: r for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])}
    assert runs["extract"].data.tags["cache"] == "miss" and runs["svm"].data.tags["cache"] == "hit"
    assert runs["extract"].data.params["cache_key"] == runs["svm"].data.params["cache_key"]
    assert runs["extract"].data.metrics["features/dim"] == 25088


def test_default_store_is_the_absolute_sqlite_under_mlruns(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    from scenesweep.tracking.mlflow_store import default_tracking_uri

    assert default_tracking_uri() == f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    assert default_tracking_uri().startswith("sqlite:////")
