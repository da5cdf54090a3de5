"""MLflow pyfunc models: the fitted head alone, and the servable image classifier.

``ImageClassifier`` holds everything needed to classify image files: the weights' own
preprocessing, the backbone up to the chosen layer (with its pooling and fc widths; the weights
travel inside the model's artifacts, so it loads offline) and the fitted head. Its input is a
column ``image`` of base64-encoded image file bytes; its output, per image, the label name,
the class index and a score per class (probabilities for mlp, decision values for svm).
``scenesweep predict`` and ``mlflow models serve`` run the same ``predict``.
"""
from __future__ import annotations

import base64
import binascii
import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext as PythonContext

from .config import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


class InputError(UserError):
    """Input to a model is not what it takes; the message says what is wrong."""


def _load_head(path: str):
    with open(path, "rb") as handle:
        return pickle.load(handle)


def _outputs(scores: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """(N, n_classes) scores -> label, class_index and one score_<class> column per class."""
    index = np.argmax(scores, axis=1)
    frame = pd.DataFrame({"label": [classes[i] for i in index], "class_index": index.astype(np.int64)})
    for k, name in enumerate(classes):
        frame[f"score_{name}"] = scores[:, k].astype(np.float64)
    return frame


class HeadModel(PythonModel):
    """The fitted head on feature vectors: (N, D) float32 -> label, class index, scores."""

    def load_context(self, context: PythonContext) -> None:
        self.head = _load_head(context.artifacts["head"])
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        features = np.asarray(model_input, dtype=np.float32)
        if features.ndim != 2:
            raise InputError(f"expected a 2-D array of feature vectors, got shape {features.shape}")
        return _outputs(self.head.predict_scores(features), self.classes)


def decode_images(model_input: Any) -> list[bytes]:
    """The ``image`` column of base64 strings (or raw bytes) -> list of image file bytes."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise InputError(f"expected a table with a column 'image', got {type(model_input).__name__}")
    if "image" not in model_input.columns:
        raise InputError(f"missing column 'image' (base64-encoded image file bytes); got columns "
                         f"{list(map(str, model_input.columns))}")
    if len(model_input) == 0:
        raise InputError("empty input: expected at least one row in column 'image'")
    images = []
    for row, value in enumerate(model_input["image"]):
        if isinstance(value, (bytes, bytearray)):
            images.append(bytes(value))
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"row {row}: column 'image' must hold a base64 string, got {type(value).__name__}")
        try:
            images.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise InputError(f"row {row}: column 'image' is not valid base64") from None
    return images


class ImageClassifier(PythonModel):
    """Preprocessing + backbone up to the feature layer + head, from image file bytes."""

    def load_context(self, context: PythonContext) -> None:
        import torch

        from . import backbone

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.spec = spec
        self.classes = spec["classes"]
        model = backbone.architecture(spec["arch"], spec["pooling"], spec["fc_width"])
        state = torch.load(context.artifacts["backbone"], map_location="cpu", weights_only=True)
        # Only the layers up to the feature layer are stored; the rest stays on the meta device.
        model.load_state_dict(state, strict=False, assign=True)
        self.model = model.eval()
        self.transform = backbone.preprocessing(spec["arch"], spec["image_size"])
        self.head = _load_head(context.artifacts["head"])

    def features(self, images: list[bytes]) -> np.ndarray:
        """Image file bytes -> (N, D) features of the model's layer."""
        import torch

        from . import backbone
        from .data import DataError, read_image

        batch = []
        for row, data in enumerate(images):
            try:
                batch.append(self.transform(read_image(data=data)))  # (3, S, S)
            except DataError:
                raise InputError(f"row {row}: not an image (expected JPEG, PNG or another image file's bytes, "
                                 "base64-encoded)") from None
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), 16):
                x = torch.stack(batch[start:start + 16]).contiguous(memory_format=torch.channels_last)
                conv_out = backbone.conv(self.model, x)  # (B, 512, h, w)
                outputs.append(backbone.from_conv(self.model, conv_out, self.spec["layer"]).numpy())
        return np.concatenate(outputs)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = decode_images(model_input)
        return _outputs(self.head.predict_scores(self.features(images)), self.classes)


def _pip_requirements() -> list[str]:
    from .tracking import pip_requirements

    return pip_requirements()


def log_head_model(result, name: str = "head") -> str:
    """Log the fitted head of a RunResult as a pyfunc model; returns its model URI."""
    prepared = result.prepared
    example = prepared.part("val")[0][:2].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        head_path, classes_path = Path(tmp) / "head.pkl", Path(tmp) / "classes.json"
        head_path.write_bytes(pickle.dumps(result.head))
        classes_path.write_text(json.dumps(list(prepared.dataset.classes)))
        model = HeadModel()
        model.load_context(PythonContext({"head": str(head_path), "classes": str(classes_path)}, None))
        signature = infer_signature(example, model.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=HeadModel(), artifacts={"head": str(head_path), "classes": str(classes_path)},
            signature=signature, input_example=example, code_paths=[str(PACKAGE_DIR)],
            pip_requirements=_pip_requirements())
    return info.model_uri


def backbone_state(config) -> dict:
    """The backbone's parameters up to the configured layer (fc8 and unused fc layers dropped)."""
    from . import backbone

    model = backbone.build_backbone(config.arch, config.weights, config.pooling, config.fc_width, config.seed)
    keep_fc = {"pool5": (), "fc6": (0,), "relu6": (0,), "fc7": (0, 3), "relu7": (0, 3)}[config.layer]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("features."):
            state[key] = value
        elif key.startswith("classifier.") and int(key.split(".")[1]) in keep_fc:
            state[key] = value
    return state


def log_image_classifier(result, name: str = "model", example_images: list[bytes] | None = None) -> str:
    """Log the servable image classifier of a RunResult; returns its model URI."""
    import torch

    prepared = result.prepared
    config = prepared.config
    spec = {"arch": config.arch, "pooling": config.pooling, "fc_width": config.fc_width, "layer": config.layer,
            "image_size": config.image_size, "classes": list(prepared.dataset.classes), "head": config.head,
            "weights": config.weights, "dataset_fingerprint": prepared.dataset.fingerprint}
    if example_images is None:
        example_images = [prepared.dataset.absolute(int(i)).read_bytes() for i in prepared.split.val[:2]]
    example = pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in example_images]})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"spec": Path(tmp) / "spec.json", "backbone": Path(tmp) / "backbone.pt",
                 "head": Path(tmp) / "head.pkl"}
        paths["spec"].write_text(json.dumps(spec, indent=1))
        torch.save(backbone_state(config), paths["backbone"])
        paths["head"].write_bytes(pickle.dumps(result.head))
        artifacts = {k: str(v) for k, v in paths.items()}
        model = ImageClassifier()
        model.load_context(PythonContext(artifacts, None))
        signature = infer_signature(example, model.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=ImageClassifier(), artifacts=artifacts, signature=signature,
            input_example=example, code_paths=[str(PACKAGE_DIR)], pip_requirements=_pip_requirements())
    return info.model_uri
