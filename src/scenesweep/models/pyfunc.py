"""MLflow pyfunc models: the fitted head alone, and the servable image classifier.

``ImageClassifier`` holds everything needed to classify image files: the weights' own
preprocessing, the backbone up to the chosen layer (with its pooling and fc widths; the weights
travel inside the model's artifacts, so it loads and serves offline) and the fitted head. Its
input is a table with a column ``image`` of base64-encoded image file bytes (JPEG, PNG, any
mode, any size); its output, per image, the label name, the class index and one
``score_<class>`` column per class (probabilities for an mlp head, decision values for an svm).
``scenesweep predict`` and ``mlflow models serve`` run the same ``predict``.

Bad input raises ``InputError``, an ``MlflowException`` with INVALID_PARAMETER_VALUE: served, it
is a 400 reply whose JSON ``message`` is our message alone (see ``InputError.message``).
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext

from ..compute import backbone
from ..compute.data import DataError, ImageTooLargeError, read_image
from ..compute.hardware import cpu_has_native_bf16, resolve_device
from ..core.errors import UserError

IMAGE_COLUMN = "image"
BATCH_SIZE = 16  # images per forward pass: beyond 8 at 224 px nothing is gained on 2 cores
# What one request may hold: the model decodes every image before any compute (a bad one fails
# first), so a request's images are all in memory at once. Larger work: several requests.
MAX_IMAGES_PER_REQUEST = 512
MAX_IMAGE_MB = 20
INPUT_DESCRIPTION = (f"a table with a column '{IMAGE_COLUMN}' of base64-encoded image file bytes "
                     "(JPEG, PNG or any format Pillow reads; grayscale or colour; any size)")


class InputError(UserError, MlflowException):
    """Input to a model is not what it takes; the message says what is wrong and in which row.

    A ``UserError``, so that the CLI prints it as one ``error: ...`` line, and an
    ``MlflowException`` with INVALID_PARAMETER_VALUE, so that ``mlflow models serve`` answers
    400 with it as the JSON ``message`` instead of a stack trace.

    Attributes:
        reason: what is wrong, e.g. "not an image".
        row: the 0-based row of the input it concerns, or None for the whole input.
    """

    def __init__(self, reason: str, row: int | None = None):
        self.reason = reason
        self.row = row
        MlflowException.__init__(self, reason if row is None else f"row {row}: {reason}",
                                 error_code=INVALID_PARAMETER_VALUE)

    # MLflow 3.17's scoring server rewrites the message of an MlflowException raised by predict
    # to "Failed to predict data '<repr of the whole input table>'. \nError: <message>", which
    # buries ours under a dump of base64 text. The message is fixed when the error is made, so
    # the reply's ``message`` is ours alone (tests/test_serving.py checks it against a server).
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if getattr(self, "_message", None) is None:
            self._message = value


def _load_head(path: str):
    with open(path, "rb") as handle:
        return pickle.load(handle)


def _outputs(head, features: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """(N, D) features -> label, class_index and one score_<class> column per class.

    Score column k belongs to the head's k-th class, ``head.classes_[k]`` (a dataset label index).
    """
    scores = head.predict_scores(features)  # (N, n_head_classes)
    class_ids = np.asarray(head.classes_, dtype=np.int64)
    index = class_ids[np.argmax(scores, axis=1)]  # (N,)
    frame = pd.DataFrame({"label": [classes[i] for i in index], "class_index": index})
    for k, class_id in enumerate(class_ids):
        frame[f"score_{classes[class_id]}"] = scores[:, k].astype(np.float64)
    return frame


class HeadModel(PythonModel):
    """The fitted head on feature vectors: (N, D) float32 -> label, class index, scores."""

    def load_context(self, context: PythonModelContext) -> None:
        self.head = _load_head(context.artifacts["head"])
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        try:
            features = np.asarray(model_input, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"expected a 2-D array of feature vectors, got {type(model_input).__name__}") from None
        if features.ndim != 2 or features.shape[0] == 0:
            raise InputError(f"expected a non-empty 2-D array of feature vectors, got shape {features.shape}")
        return _outputs(self.head, features, self.classes)


def _input_table(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict) and all(isinstance(v, str) for v in model_input.values()):
        model_input = [model_input]  # one record, {"image": "<base64>"}
    if isinstance(model_input, (dict, list)):
        try:
            return pd.DataFrame(model_input)
        except (TypeError, ValueError):
            pass
    raise InputError(f"expected {INPUT_DESCRIPTION}; got {type(model_input).__name__}")


def decode_images(model_input: Any) -> list[bytes]:
    """The ``image`` column of base64 strings -> the image file bytes of each row.

    Whitespace inside the base64 text is ignored (``base64`` wraps lines at 76 characters), and
    so is a ``data:image/...;base64,`` prefix.

    Raises:
        InputError: a missing column, an empty table, more than ``MAX_IMAGES_PER_REQUEST`` rows,
            an empty, non-string or over ``MAX_IMAGE_MB`` value, or text that is not base64; the
            message names the row.
    """
    table = _input_table(model_input)
    # No rows, and either the image column or no column at all ({"inputs": []}): an empty request.
    if len(table) == 0 and (IMAGE_COLUMN in table.columns or len(table.columns) == 0):
        raise InputError(f"empty input: expected at least one row in column '{IMAGE_COLUMN}'")
    if IMAGE_COLUMN not in table.columns:
        # (MLflow's schema check drops the columns it does not know before the model sees them.)
        columns = ", ".join(repr(str(c)) for c in table.columns)
        raise InputError(f"missing column '{IMAGE_COLUMN}': expected {INPUT_DESCRIPTION}"
                         + (f"; got columns {columns}" if columns else ""))
    if len(table) > MAX_IMAGES_PER_REQUEST:
        raise InputError(f"{len(table)} images in one request: at most {MAX_IMAGES_PER_REQUEST}; "
                         "send them in several requests")
    images = []
    for row, value in enumerate(table[IMAGE_COLUMN]):
        if not isinstance(value, str):
            kind = "null" if value is None or (isinstance(value, float) and np.isnan(value)) else type(value).__name__
            raise InputError(f"column '{IMAGE_COLUMN}' must hold base64 text, got {kind}", row)
        if len(value) * 3 // 4 > MAX_IMAGE_MB * 2**20:  # checked before decoding: base64 is 4/3 the file
            raise InputError(f"image file of about {len(value) * 3 / 4 / 2**20:.0f} MB: at most {MAX_IMAGE_MB} MB "
                             "per image", row)
        text = "".join(value.split())
        if text.startswith("data:") and ";base64," in text[:100]:
            text = text.split(";base64,", 1)[1]
        if not text:
            raise InputError(f"column '{IMAGE_COLUMN}' is empty: expected base64-encoded image file bytes", row)
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            shown = value.strip()[:20] + ("..." if len(value.strip()) > 20 else "")
            raise InputError(f"column '{IMAGE_COLUMN}' is not valid base64 ({shown!r})", row) from None
    return images


def serving_precision(trained: str, device) -> str:
    """The precision the training features were extracted in, where the hardware runs it natively.

    Served features then match the cached ones the head was fitted on (bf16 moves them by about
    1e-2 relative); a machine without native bf16 would run it emulated, far slower: fp32 there.
    """
    if trained == "bf16" and (device.type == "cuda" or cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


class ImageClassifier(PythonModel):
    """Preprocessing + backbone up to the feature layer + head, from image file bytes."""

    def load_context(self, context: PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.spec = spec
        self.classes = list(spec["classes"])
        self.layer = spec["layer"]
        self.device = resolve_device("auto")
        self.precision = serving_precision(spec.get("precision", "fp32"), self.device)
        # The structure on the meta device, then the stored tensors assigned in place: the ImageNet
        # classifier (VGG's fc8, and fc6/fc7 for pool5) is not stored and stays on meta, never computed.
        model = backbone.architecture(spec["arch"], spec["pooling"], spec["fc_width"], spec["image_size"])
        state = torch.load(context.artifacts["backbone"], map_location="cpu", weights_only=True)
        missing = set(backbone.tap_state_keys(model, self.layer)) - set(state)
        if missing:
            raise MlflowException(f"backbone.pt lacks {', '.join(sorted(missing))} needed for layer {self.layer}")
        model.load_state_dict(state, strict=False, assign=True)
        # As in extraction: the trunk and the tap's layers in the extraction precision, channels_last.
        # The stored weights are in that precision already (bf16 for bf16 features, see
        # models.logged.storage_precision); a bf16 backbone served where bf16 is not native
        # runs in fp32 on the same (bf16-rounded) weights.
        self.model = backbone.to_inference(model, self.device, self.precision, self.layer)
        self.dtype = backbone.compute_dtype(self.precision)
        self.transform = backbone.preprocessing(spec["arch"], spec["image_size"])
        self.head = _load_head(context.artifacts["head"])

    def _pixels(self, images: list[bytes]) -> list:
        """Decode and preprocess every image first, so that a bad one fails before any compute."""
        tensors = []
        for row, data in enumerate(images):
            try:
                # Grayscale is repeated to 3 channels; then resize, centre crop, normalise.
                tensors.append(self.transform(read_image(data=data)))  # (3, S, S)
            except ImageTooLargeError as error:
                raise InputError(f"image too large ({error.detail})", row) from None
            except DataError:
                raise InputError("not an image: expected the bytes of a JPEG, PNG or other image file, "
                                 "base64-encoded", row) from None
        return tensors

    def features(self, images: list[bytes]) -> np.ndarray:
        """Image file bytes -> (N, D) features of the model's layer (D = 25088 for VGG's pool5)."""
        tensors = self._pixels(images)
        outputs = [self.network_features(torch.stack(tensors[start:start + BATCH_SIZE]))  # (B, 3, S, S) each
                   for start in range(0, len(tensors), BATCH_SIZE)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def network_features(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) preprocessed pixels -> (B, D) features: the network alone, as extraction runs it
        (``benchmarks/serve.py`` times it against the whole predict)."""
        with torch.inference_mode():
            x = pixels.to(self.device).to(dtype=self.dtype, memory_format=torch.channels_last)
            trunk_out = backbone.trunk_forward(self.model, x).float()  # VGG: (B, 512, S/32, S/32)
            return backbone.from_trunk(self.model, trunk_out, self.layer).cpu().numpy()  # (B, D)

    # The hint pd.DataFrame is one MLflow infers no schema from: the table reaches predict as
    # sent, and MLflow does not warn at import that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Table with column ``image`` (base64 text) -> label, class_index, score_<class> per row."""
        images = decode_images(model_input)
        return _outputs(self.head, self._compute_thread().submit(self.features, images).result(), self.classes)

    def _compute_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one thread that runs every predict's torch work. MLflow's scoring server calls
        predict from whichever thread of asyncio's pool is free (``asyncio.to_thread``), and each
        thread that enters torch gets an OpenMP team of its own, whose idle threads spin beside
        the busy ones: served one image at 224 px took 1.17x the in-process call on 2 cores
        (benchmarks/serve.py). One thread, one team, wherever predict is called from."""
        if getattr(self, "_thread", None) is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scenesweep-predict")
        return self._thread

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_thread"}  # a thread does not pickle
