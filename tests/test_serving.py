"""The servable image classifier: in process, through `scenesweep predict`, and over REST.

One svm run (3 classes, pool5, 32 px) is tracked and registered once for the module, against
its own SQLite store, and promoted to @champion; `mlflow models serve` then serves that alias.
"""
import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
import torch
from click.testing import CliRunner

from scenesweep.compute import backbone
from scenesweep.cli.main import main
from scenesweep.core.backbone_families import FAMILIES
from scenesweep.core.config import make_config
from scenesweep.models.promotion import promote
from scenesweep.models.logged import log_image_classifier
from scenesweep.models.pyfunc import InputError
from scenesweep.services import servers
from scenesweep.compute.training import fit_head, prepare

from helpers import CLASSES, assert_one_error, post_json, run_cli, wait_until_serving
from test_registry import write_flat_scenes

pytestmark = pytest.mark.slow
MODEL = "scene-classifier"
CHAMPION_URI = f"models:/{MODEL}@champion"
SVM_SETTINGS = {"train_per_class": 10, "layer": "pool5", "image_size": 32, "C": 1.0}


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tracked svm run registered as scene-classifier version 1 and promoted to @champion."""
    from scenesweep.runs.single import track_single_run

    folder = tmp_path_factory.mktemp("serving")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'store' / 'mlflow.db'}", "SCENESWEEP_OFFLINE": "1",
           "TORCH_HOME": str(folder / "torch_home"), "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    scenes = write_flat_scenes(folder / "scenes")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        run_id, result = track_single_run("svm", {"data": str(scenes), "cache_dir": str(folder / "cache"),
                                                  **SVM_SETTINGS}, progress=False, register=MODEL)
        assert promote(MODEL).promoted
    prepared = result.prepared
    test_paths = [prepared.dataset.absolute(int(i)) for i in prepared.split.test]
    return SimpleNamespace(env=env, folder=folder, scenes=scenes, run_id=run_id, result=result, test_paths=test_paths)


@pytest.fixture
def store(trained, monkeypatch):
    """Point this test at the module's store (the autouse fixture gave it an empty one)."""
    for key, value in trained.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(trained.env["MLFLOW_TRACKING_URI"])
    return trained


@pytest.fixture(scope="module")
def champion(trained):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.env["MLFLOW_TRACKING_URI"])
        mlflow.set_tracking_uri(trained.env["MLFLOW_TRACKING_URI"])
        return mlflow.pyfunc.load_model(CHAMPION_URI)


def table(paths) -> pd.DataFrame:
    return pd.DataFrame({"image": [b64(p) for p in paths]})


def score_matrix(predictions: pd.DataFrame) -> np.ndarray:
    return predictions[[f"score_{name}" for name in CLASSES]].to_numpy()


def test_the_champion_predicts_like_the_in_process_head(store, champion):
    """PNG and JPEG, grayscale and colour, several sizes: the test split, from file bytes."""
    result = store.result
    X_test, _ = result.prepared.part("test")  # cached features, (N, 25088)
    predictions = champion.predict(table(store.test_paths))
    expected = result.head.predict(X_test)
    assert list(predictions["class_index"]) == list(expected)
    assert list(predictions["label"]) == [CLASSES[i] for i in expected]
    # Decision values of the svm, from features computed in the served model's own pass.
    np.testing.assert_allclose(score_matrix(predictions), result.head.predict_scores(X_test), rtol=1e-5, atol=1e-6)
    # The input column is declared: MLflow's model page and clients show it.
    assert [(c.name, c.type.name, c.required) for c in champion.metadata.get_input_schema().inputs] == [
        ("image", "string", True)]


def test_predict_from_many_threads_runs_torch_on_one_and_answers_alike(store, champion):
    """MLflow's scoring server calls predict from whichever thread of asyncio's pool is free: the
    model's torch work runs on its one compute thread all the same (one OpenMP team, none spinning
    idle beside it), and every caller gets the same answer."""
    classifier = champion.unwrap_python_model()
    torch_threads = set()
    features = classifier.features

    def recording(images):
        torch_threads.add(threading.current_thread().name)
        return features(images)

    classifier.features = recording
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as callers:
            answers = list(callers.map(lambda _: champion.predict(table(store.test_paths[:2])), range(8)))
    finally:
        del classifier.features
    assert len(torch_threads) == 1 and next(iter(torch_threads)).startswith("scenesweep-predict"), torch_threads
    assert all(a.equals(answers[0]) for a in answers)


def test_an_mlp_head_scores_are_probabilities(store, champion):
    settings = {k: v for k, v in SVM_SETTINGS.items() if k != "C"}
    config = make_config("mlp", {"data": str(store.scenes), "cache_dir": str(store.folder / "cache"),
                                 "hidden": "32", "epochs": 5, "batch_size": 8, **settings})
    result = fit_head(prepare(config, progress=False), config)
    with mlflow.start_run():
        uri = log_image_classifier(result, name="mlp_model").model_uri
    model = mlflow.pyfunc.load_model(uri)
    X_test, _ = result.prepared.part("test")
    predictions = model.predict(table(store.test_paths))
    scores = score_matrix(predictions)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert (scores >= 0).all()
    assert list(predictions["class_index"]) == list(result.head.predict(X_test))


BAD_INPUTS = [
    ("not base64", pd.DataFrame({"image": ["this is not base64!"]}), "row 0: column 'image' is not valid base64"),
    ("not an image", pd.DataFrame({"image": [base64.b64encode(b"hello world").decode()]}),
     "row 0: not an image: expected the bytes of a JPEG, PNG or other image file, base64-encoded"),
    # (MLflow's schema check answers this one, naming the column and what was sent)
    ("missing column", pd.DataFrame({"picture": ["aGk="]}), "Failed to enforce schema"),
    ("empty input", pd.DataFrame({"image": pd.Series([], dtype=object)}), "empty input: expected at least one row"),
    # What one request may hold: refused before decoding anything.
    ("too many images", pd.DataFrame({"image": ["aGk="] * 513}), "513 images in one request: at most 512"),
    ("too large an image", pd.DataFrame({"image": ["aGk=", "A" * (28 * 2**20)]}),
     "row 1: image file of about 21 MB: at most 20 MB per image"),
]


@pytest.mark.parametrize("name, frame, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(champion, name, frame, message):
    with pytest.raises(MlflowException) as caught:  # InputError is one: the server answers 400
        champion.predict(frame)
    assert str(caught.value).startswith(message), str(caught.value)
    if name == "missing column":
        assert "missing inputs ['image']" in str(caught.value) and "'picture'" in str(caught.value)
    else:
        assert isinstance(caught.value, InputError)


def test_the_second_row_is_named(store, champion):
    frame = pd.DataFrame({"image": [b64(store.test_paths[0]), "%%%"]})
    with pytest.raises(InputError, match=r"^row 1: column 'image' is not valid base64"):
        champion.predict(frame)


def test_predict_command_classifies_files_as_the_model_does(store, champion):
    """As a user runs it: a new process, the champion from the store, JSON out."""
    paths = store.test_paths[:4]
    expected = champion.predict(table(paths))
    result = run_cli("predict", *map(str, paths), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == list(map(str, paths))
    assert [r["label"] for r in rows] == list(expected["label"])
    assert [r["class_index"] for r in rows] == list(expected["class_index"])
    np.testing.assert_allclose([[r["scores"][name] for name in CLASSES] for r in rows], score_matrix(expected),
                               rtol=1e-6)


def invoke(*args: str):
    """The CLI in this process (the subprocess test above covers a real start): stdout, stderr, exit."""
    return CliRunner().invoke(main, list(args))


def test_predict_command_prints_a_table_and_names_a_bad_file(store):
    paths = store.test_paths[:2]
    result = invoke("predict", *map(str, paths), "--model-uri", f"models:/{MODEL}/1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "label", "class_index", "score"]
    for path, line in zip(paths, lines[1:]):
        file, label, index, score = line.split()
        assert file == str(path) and label in CLASSES and CLASSES[int(index)] == label and float(score)

    not_an_image = store.folder / "notes.jpg"
    not_an_image.write_text("not a picture")
    assert_one_error(invoke("predict", str(paths[0]), str(not_an_image)),
                     f"{not_an_image}: not an image: expected the bytes of a JPEG, PNG or other image file, "
                     "base64-encoded")
    assert_one_error(invoke("predict", str(store.folder / "nowhere.png")), f"{store.folder / 'nowhere.png'}: "
                     "image file not found")
    result = invoke("predict", str(paths[0]), "--model-uri", f"models:/{MODEL}@nobody")
    assert result.exit_code == 2 and f"--model-uri=models:/{MODEL}@nobody: cannot load it" in result.stderr


def split(*values) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def test_mlflow_models_serve_answers_images_and_bad_input(store, champion):
    port = servers.free_port()
    bin_dir = Path(sys.executable).parent
    # uvicorn is started by name: the venv's bin must be on PATH, as it is once activated.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(store.folder / "serve.log", "w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", CHAMPION_URI, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/ping", server, store.folder / "serve.log", timeout_s=90)

        paths = store.test_paths
        expected = champion.predict(table(paths))
        status, answer = post_json(f"{base}/invocations", split(*[b64(p) for p in paths]))
        assert status == 200, answer
        assert [p["label"] for p in answer["predictions"]] == list(expected["label"])
        assert [p["class_index"] for p in answer["predictions"]] == list(expected["class_index"])

        bad_requests = {
            "not base64": (split("this is not base64!"), "row 0: column 'image' is not valid base64"),
            "not an image": (split(base64.b64encode(b"hello world").decode()), "row 0: not an image"),
            # MLflow's schema check (the signature declares the column) answers this one.
            "missing column": ({"dataframe_split": {"columns": ["picture"], "data": [[b64(paths[0])]]}},
                               "Failed to predict data"),
            "empty input": ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty input"),
        }
        for name, (body, message) in bad_requests.items():
            status, answer = post_json(f"{base}/invocations", body)
            assert 400 <= status < 500, (name, status, answer)
            assert answer["message"].startswith(message), (name, answer)
            if name == "missing column":
                assert "missing inputs ['image']" in answer["message"] and "'picture'" in answer["message"]
            assert "stack_trace" not in answer and "Traceback" not in answer["message"], (name, answer)

        # Still serving, and a single image in the records format too.
        status, answer = post_json(f"{base}/invocations", {"dataframe_records": [{"image": b64(paths[0])}]})
        assert status == 200 and answer["predictions"][0]["label"] == expected["label"][0]
    finally:
        servers.stop(server)  # its whole process group (the server and its uvicorn worker)
        log.close()


def test_mlflow_models_predict_and_pyfunc_load_model_on_the_champion(store, champion, tmp_path):
    """MLflow's own clients on the alias: `mlflow models predict` (a JSON request file, as for
    the REST server) and `mlflow.pyfunc.load_model(...).predict(frame)` agree with each other."""
    paths = store.test_paths[:4]
    request = tmp_path / "request.json"
    request.write_text(json.dumps(split(*[b64(p) for p in paths])))
    output = tmp_path / "predictions.json"
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "mlflow"), "models", "predict", "-m", CHAMPION_URI, "-i", str(request),
                             "-t", "json", "-o", str(output), "--env-manager", "local"],
                            capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = pd.DataFrame(json.loads(output.read_text())["predictions"])
    frame = pd.DataFrame({"image": [b64(p) for p in paths]})
    expected = mlflow.pyfunc.load_model(CHAMPION_URI).predict(frame)
    assert list(predicted["label"]) == list(expected["label"])
    assert list(predicted["class_index"]) == list(expected["class_index"])
    np.testing.assert_allclose(score_matrix(predicted), score_matrix(expected), rtol=1e-6, atol=1e-9)


def backbone_file(model_uri: str) -> Path:
    """The logged model's backbone.pt where the store keeps it (a local artifact store)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(url2pathname(urlparse(location).path)) / "artifacts" / "backbone.pt"


def test_a_version_stores_its_backbone_in_the_extraction_precision_and_shares_it(store):
    """bf16 features: a bf16 backbone (half the bytes) that serves the same scores as fp32 would;
    the next model with the same weights takes no new disk for them (one file, hard-linked)."""
    from scenesweep.models import logged

    client = mlflow.MlflowClient()
    version = client.get_model_version(MODEL, "1")
    first = backbone_file(version.source)
    spec = json.loads((first.parent / "spec.json").read_text())
    precision = store.result.prepared.features.precision
    assert spec["backbone_precision"] == logged.storage_precision(precision) == ("bf16" if precision == "bf16" else "fp32")
    state = torch.load(first, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {backbone.compute_dtype(spec["backbone_precision"])}
    assert logged.state_digest(state) == spec["backbone_sha256"]
    parameters = sum(t.numel() for t in state.values())
    assert first.stat().st_size < parameters * state["features.0.weight"].element_size() * 1.01
    with mlflow.start_run():
        uri = log_image_classifier(store.result, name="model_again").model_uri
    again = backbone_file(uri)
    assert again != first and again.samefile(first)  # one file on disk for both models
    assert first.stat().st_nlink >= 3  # both models and the store's shared copy
    paths = store.test_paths[:3]
    np.testing.assert_array_equal(score_matrix(mlflow.pyfunc.load_model(uri).predict(table(paths))),
                                  score_matrix(mlflow.pyfunc.load_model(CHAMPION_URI).predict(table(paths))))


def test_bf16_stored_backbone_serves_the_scores_of_the_fp32_stored_one(store, monkeypatch):
    """Where the features were bf16 and the hardware runs bf16 the served model rounds fp32
    weights to bf16 anyway: the two stored precisions give the same scores, bit for bit.
    Served in fp32 instead (a machine without native bf16), they differ by rounding only."""
    from scenesweep.compute.hardware import cpu_has_native_bf16
    from scenesweep.models import logged, pyfunc

    if store.result.prepared.features.precision != "bf16":
        pytest.skip("features were extracted in fp32 here: the backbone is stored in fp32")
    paths = store.test_paths
    with monkeypatch.context() as patch, mlflow.start_run():
        patch.setattr(logged, "storage_precision", lambda precision: "fp32")
        fp32_uri = log_image_classifier(store.result, name="model_fp32").model_uri
    fp32_scores = score_matrix(mlflow.pyfunc.load_model(fp32_uri).predict(table(paths)))
    bf16_scores = score_matrix(mlflow.pyfunc.load_model(CHAMPION_URI).predict(table(paths)))
    if cpu_has_native_bf16():
        np.testing.assert_array_equal(bf16_scores, fp32_scores)
    monkeypatch.setattr(pyfunc, "serving_precision", lambda trained, device: "fp32")
    fp32_served = {name: score_matrix(mlflow.pyfunc.load_model(uri).predict(table(paths)))
                   for name, uri in (("fp32", fp32_uri), ("bf16", CHAMPION_URI))}
    np.testing.assert_allclose(fp32_served["bf16"], fp32_served["fp32"], atol=0.02 * np.abs(fp32_scores).max())
    assert (fp32_served["bf16"].argmax(axis=1) == fp32_served["fp32"].argmax(axis=1)).mean() >= 0.9


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_backbone_family_is_cached_registered_and_served(family, flat_scenes, tmp_path):
    """Each family's first architecture and first feature layer at 32 px, random weights: a second
    run reads the trunk and the layer from the cache; the registered version, loaded as `mlflow
    models serve` loads it, classifies the test images from their file bytes as the head did."""
    from scenesweep.runs.single import track_single_run

    arch, layer = family.archs[0], family.taps[0]
    name = f"scenes-{family.name}"
    settings = {"data": str(flat_scenes), "train_per_class": 10, "image_size": 32, "arch": arch, "layer": layer,
                "cache_dir": str(tmp_path / "cache")}
    first_id, result = track_single_run("svm", settings, progress=False, register=name)
    second_id, _ = track_single_run("svm", {**settings, "C": 0.5}, progress=False)
    client = mlflow.MlflowClient()
    first, second = client.get_run(first_id).data, client.get_run(second_id).data
    assert (first.tags["conv_cache"], first.tags["cache"]) == ("miss", "miss")
    assert (second.tags["conv_cache"], second.tags["cache"]) == ("hit", "hit")
    assert first.params["backbone.family"] == family.name
    assert int(first.params["backbone.feature_dim"]) == backbone.layer_width(arch, layer) == result.prepared.features.values.shape[1]

    version = client.get_model_version(name, "1")
    record = client.get_logged_model(version.tags["model_id"])
    assert (record.params["arch"], record.params["layer"]) == (arch, layer)
    served = mlflow.pyfunc.load_model(f"models:/{name}/1")
    paths = [result.prepared.dataset.absolute(int(i)) for i in result.prepared.split.test]
    predictions = served.predict(table(paths))
    X_test, _ = result.prepared.part("test")
    scores = result.head.predict_scores(X_test)
    # bf16 trunks (LayerNorm, attention) round a little differently in batches of another size.
    np.testing.assert_allclose(score_matrix(predictions), scores, rtol=1e-2, atol=1e-2 * np.abs(scores).max())
    agree = np.mean(np.asarray(predictions["class_index"]) == result.head.predict(X_test))
    assert agree >= 0.9, agree
