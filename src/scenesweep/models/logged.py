"""Logging our pyfunc models into a run: the fitted head alone (on feature vectors), and the
servable image classifier (preprocessing, the backbone up to the layer with its weights, the
head), each with a signature, an input example, explicit pip requirements and the package's code.

The backbone is most of a servable model (relu7: 538 MB in fp32). It is stored in the precision
its features were extracted in (bf16 halves it and changes no served score), and, on a local
artifact store, every model whose backbone holds the same weights shares one file (a hard link
to ``<artifact root>/.shared/backbones/<sha256>.pt``): each model folder stays complete and
self-contained, and the weights take the disk once.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.pyfunc.model import PythonModelContext
from mlflow.types import ColSpec, DataType, Schema

from ..compute import backbone
from ..compute.features import built_backbone
from ..compute.hardware import resolve_device
from ..compute.serving_cost import backbone_bytes
from ..tracking.provenance import pip_requirements
from ..tracking.mlflow_store import artifact_root
from .pyfunc import IMAGE_COLUMN, INPUT_DESCRIPTION, HeadModel, ImageClassifier

# The models carry the package's code (models load and serve without it installed).
PACKAGE_DIR = Path(__file__).resolve().parents[1]


# What MLflow says every time it logs one of our pyfunc models, known and expected here:
# python_model is pickled with cloudpickle (the class is pickled by reference to this module),
# the input example is validated, and class_index is an integer column (it is never missing).
KNOWN_LOG_MESSAGES = ("Passing a Python object as `python_model`", "Validating input example against model signature")
KNOWN_WARNINGS = r"Hint: Inferred schema contains integer column"


class _DropKnownMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_LOG_MESSAGES)


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Silence what MLflow prints about our own pyfunc models while they are logged (only that:
    any other warning, e.g. a failed serving-input validation, still shows)."""
    logger = logging.getLogger("mlflow.pyfunc")
    known = _DropKnownMessages()
    logger.addFilter(known)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=KNOWN_WARNINGS, category=UserWarning)
            yield
    finally:
        logger.removeFilter(known)


def log_head_model(result, name: str = "head") -> str:
    """Log the fitted head of a RunResult as a pyfunc model on feature vectors.

    Returns:
        Its model URI (``models:/m-...``).
    """
    prepared = result.prepared
    example = prepared.part("val")[0][:2].astype(np.float32)  # (2, D)
    with tempfile.TemporaryDirectory() as tmp:
        head_path, classes_path = Path(tmp) / "head.pkl", Path(tmp) / "classes.json"
        head_path.write_bytes(pickle.dumps(result.head))
        classes_path.write_text(json.dumps(list(prepared.dataset.classes)))
        artifacts = {"head": str(head_path), "classes": str(classes_path)}
        model = HeadModel()
        model.load_context(PythonModelContext(artifacts, None))
        with quiet_model_logging():
            signature = infer_signature(example, model.predict(None, example))
            info = mlflow.pyfunc.log_model(
                name=name, python_model=HeadModel(), artifacts=artifacts, signature=signature,
                input_example=example, code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements())
    return info.model_uri


def storage_precision(extraction_precision: str) -> str:
    """The precision the backbone is stored in: the one its features were extracted in.

    Features extracted in bf16 came from the weights rounded to bf16 (the whole network runs in
    bf16, fc6/fc7 included), and the served model runs them in bf16 wherever the hardware does:
    storing them in bf16 halves the model (relu7: 538 MB -> 269 MB) and changes no served score.
    Features extracted in fp32 keep fp32 weights.
    """
    return "bf16" if extraction_precision == "bf16" else "fp32"


def backbone_state(config, precision: str = "fp32", extraction_precision: str | None = None) -> dict:
    """The backbone's parameters and buffers up to the configured layer (the ImageNet classifier
    and unused fc layers dropped), on the CPU, floating-point ones in ``precision`` ("fp32" or
    "bf16"; counts such as BatchNorm's ``num_batches_tracked`` stay integers).

    The network this process built for the features is reused when there is one (a sweep's
    summary registers right after its trials: VGG16 with fc6/fc7 16384 wide is 700 M parameters
    to initialise again); its weights are those of a fresh build, rounded to the extraction
    precision, which is the stored precision (``storage_precision``).

    VGG16 with relu7: 134 M parameters (538 MB in fp32, 269 MB in bf16); with pool5 the conv
    layers alone (59 MB, 29 MB); ResNet-50's pool: 23.5 M (94 MB in fp32).
    """
    if extraction_precision is not None and storage_precision(extraction_precision) == precision:
        model = built_backbone(config, resolve_device(config.device), extraction_precision)
    else:
        model = backbone.build_configured(config)
    state = model.state_dict()
    dtype = backbone.compute_dtype(precision)
    return {key: state[key].to("cpu", dtype) if state[key].is_floating_point() else state[key].cpu()
            for key in backbone.tap_state_keys(model, config.layer)}


# What a logged model holds beside its backbone and head: MLmodel, spec.json, the input example,
# requirements and environment files (measured: 9 to 14 kB for a digits model).
MODEL_FILES_BYTES = 16_000
_CODE_BYTES: list[int] = []


def _code_bytes() -> int:
    """The package's code that every model carries (``code_paths``), as MLflow copies it."""
    if not _CODE_BYTES:
        _CODE_BYTES.append(sum(f.stat().st_size for f in PACKAGE_DIR.rglob("*") if f.is_file()))
    return _CODE_BYTES[0]


def model_size_mb(config, extraction_precision: str, head) -> float:
    """What the servable model of a run with ``config`` and ``head`` takes on disk (MB, 2**20
    bytes), without logging it: its backbone's tensors up to the layer in the stored precision
    (``storage_precision``), the pickled head, the package's code and the model's small files.
    Within 1 % of the ``model/size_mb`` a registered version's record carries (tested)."""
    stored = backbone_bytes(config.arch, config.pooling, config.fc_width, config.layer, config.image_size,
                            storage_precision(extraction_precision))
    return (stored + len(pickle.dumps(head)) + _code_bytes() + MODEL_FILES_BYTES) / 2**20


SHARED_BACKBONES = Path(".shared") / "backbones"  # under the store's artifact root


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (``torch.save`` files of equal
    tensors differ: each holds a random serialization id)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # 0-d counts too
    return digest.hexdigest()


def _local_path(uri: str | None) -> Path | None:
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def share_backbone(model_id: str, digest: str) -> bool:
    """Make a logged model's ``backbone.pt`` a hard link to the store's one file of these weights.

    Only where the model's artifacts and the store's artifact root are local folders on one
    file system (the project's SQLite store); anything else keeps its own copy. The shared file
    is replaced atomically; one no model links any more is removed.

    Returns:
        Whether the model now shares its backbone file (True also for the first model of
        these weights, which the others will share).
    """
    folder, root = _local_path(mlflow.get_logged_model(model_id).artifact_location), _local_path(artifact_root())
    if folder is None or root is None:
        return False
    logged, shared_dir = folder / "artifacts" / "backbone.pt", root / SHARED_BACKBONES
    temporary = logged.with_name(f".backbone-{os.getpid()}.pt")
    try:
        shared_dir.mkdir(parents=True, exist_ok=True)
        for unused in shared_dir.glob("*.pt"):
            if unused.stat().st_nlink == 1:  # no model links it any more
                unused.unlink(missing_ok=True)
        shared = shared_dir / f"{digest}.pt"
        try:
            os.link(logged, shared)  # the first model of these weights: its file is the shared one
            return True
        except FileExistsError:
            pass
        if os.path.samefile(shared, logged):
            return True
        os.link(shared, temporary)
        os.replace(temporary, logged)
        return True
    except OSError:  # another file system, links refused, a race with a removal: a copy of its own
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return False


def classifier_spec(result) -> dict:
    """What the servable model needs to rebuild the pipeline of ``result``, and where it came from."""
    prepared = result.prepared
    config = prepared.config
    return {"arch": config.arch, "pooling": config.pooling, "fc_width": config.fc_width, "layer": config.layer,
            "image_size": config.image_size, "precision": prepared.features.precision,
            "backbone_precision": storage_precision(prepared.features.precision),
            "classes": list(prepared.dataset.classes), "head": config.head, "weights": str(config.weights),
            "seed": config.seed, "dataset_fingerprint": prepared.dataset.fingerprint,
            "score": "probability" if config.head == "mlp" else "decision value"}


@dataclasses.dataclass(frozen=True)
class LoggedClassifier:
    """A servable model as MLflow 3 records it: ``models:/m-...``, its id and its size on disk."""

    model_uri: str
    model_id: str
    size_mb: float


def log_image_classifier(result, name: str = "model", example_images: list[bytes] | None = None,
                         source_run_id: str | None = None, params: dict | None = None,
                         tags: dict | None = None) -> LoggedClassifier:
    """Log the servable image classifier of a RunResult as an MLflow 3 model record.

    The record (``mlflow.initialize_logged_model``) names ``source_run_id`` as its source (a study's
    best trial; default: the active run) and carries ``params`` and ``tags``, nothing of any run's
    own; the model is saved, uploaded into the record and the record finalised READY.

    Args:
        result: a fitted RunResult (its head, configuration and dataset).
        name: the model's name, e.g. "scene-classifier-svm-pool5".
        example_images: image file bytes for the input example; default the first validation image.
        source_run_id, params, tags: the record's source run, params and tags.
    """
    prepared = result.prepared
    spec = classifier_spec(result)
    client = mlflow.MlflowClient()
    if source_run_id is None and mlflow.active_run() is not None:
        source_run_id = mlflow.active_run().info.run_id
    experiment_id = client.get_run(source_run_id).info.experiment_id if source_run_id else None
    record = mlflow.initialize_logged_model(
        name=name, source_run_id=source_run_id, model_type="image-classifier", experiment_id=experiment_id,
        params={k: str(v) for k, v in (params or {}).items()}, tags={k: str(v) for k, v in (tags or {}).items()})
    if example_images is None:
        example_images = [prepared.dataset.absolute(int(prepared.split.val[0])).read_bytes()]
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(b).decode("ascii") for b in example_images]})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"spec": Path(tmp) / "spec.json", "backbone": Path(tmp) / "backbone.pt",
                     "head": Path(tmp) / "head.pkl"}
            state = backbone_state(prepared.config, spec["backbone_precision"], prepared.features.precision)
            spec["backbone_sha256"] = state_digest(state)
            torch.save(state, paths["backbone"])
            del state
            paths["spec"].write_text(json.dumps(spec, indent=1))
            paths["head"].write_bytes(pickle.dumps(result.head))
            artifacts = {k: str(v) for k, v in paths.items()}
            model = ImageClassifier()
            model.load_context(PythonModelContext(artifacts, None))
            saved = Path(tmp) / "model"
            with quiet_model_logging():
                # The input column declared (the model page shows it; clients read it): MLflow
                # itself then answers a missing column or a non-string one (its message names the
                # column and what was sent); the model checks the values, naming the row.
                outputs = infer_signature(example, model.predict(None, example)).outputs
                inputs = Schema([ColSpec(DataType.string, IMAGE_COLUMN)])
                mlflow.pyfunc.save_model(
                    str(saved), python_model=ImageClassifier(), artifacts=artifacts,
                    signature=ModelSignature(inputs=inputs, outputs=outputs), input_example=example,
                    code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements(),
                    metadata={"input": INPUT_DESCRIPTION, **{k: v for k, v in spec.items() if k != "classes"}})
            size_mb = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 2**20
            client.log_model_artifacts(record.model_id, str(saved))
    except BaseException:
        client.finalize_logged_model(record.model_id, "FAILED")
        raise
    client.finalize_logged_model(record.model_id, "READY")
    share_backbone(record.model_id, spec["backbone_sha256"])
    return LoggedClassifier(f"models:/{record.model_id}", record.model_id, size_mb)
