"""Logging our pyfunc models into a run: the fitted head alone (on feature vectors), and the
servable image classifier (preprocessing, the backbone up to the layer with its weights, the
head), each with a signature, an input example, explicit pip requirements and the package's code.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.pyfunc.model import PythonModelContext

from ..compute import backbone
from ..tracking.provenance import pip_requirements
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


def backbone_state(config) -> dict:
    """The backbone's parameters up to the configured layer, fp32 (fc8 and unused fc layers dropped).

    With relu7 that is 134 M parameters (537 MB); with pool5 the conv layers alone (59 MB).
    """
    model = backbone.build_backbone(config.arch, config.weights, config.pooling, config.fc_width, config.seed)
    state = model.state_dict()
    return {key: state[key] for key in backbone.layer_state_keys(state, config.layer)}


def classifier_spec(result) -> dict:
    """What the servable model needs to rebuild the pipeline of ``result``, and where it came from."""
    prepared = result.prepared
    config = prepared.config
    return {"arch": config.arch, "pooling": config.pooling, "fc_width": config.fc_width, "layer": config.layer,
            "image_size": config.image_size, "precision": prepared.features.precision,
            "classes": list(prepared.dataset.classes), "head": config.head, "weights": str(config.weights),
            "seed": config.seed, "dataset_fingerprint": prepared.dataset.fingerprint,
            "score": "probability" if config.head == "mlp" else "decision value"}


def log_image_classifier(result, name: str = "model", example_images: list[bytes] | None = None) -> str:
    """Log the servable image classifier of a RunResult in the active run.

    Args:
        result: a fitted RunResult (its head, configuration and dataset).
        name: the logged model's name.
        example_images: image file bytes for the input example; default the first validation image.

    Returns:
        Its model URI (``models:/m-...``).
    """
    prepared = result.prepared
    spec = classifier_spec(result)
    if example_images is None:
        example_images = [prepared.dataset.absolute(int(prepared.split.val[0])).read_bytes()]
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(b).decode("ascii") for b in example_images]})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"spec": Path(tmp) / "spec.json", "backbone": Path(tmp) / "backbone.pt",
                 "head": Path(tmp) / "head.pkl"}
        paths["spec"].write_text(json.dumps(spec, indent=1))
        torch.save(backbone_state(prepared.config), paths["backbone"])
        paths["head"].write_bytes(pickle.dumps(result.head))
        artifacts = {k: str(v) for k, v in paths.items()}
        model = ImageClassifier()
        model.load_context(PythonModelContext(artifacts, None))
        with quiet_model_logging():
            # Outputs only: with an input schema MLflow would check the table before predict and
            # answer a missing column or a wrong type with its own message; ours names the row.
            outputs = infer_signature(example, model.predict(None, example)).outputs
            info = mlflow.pyfunc.log_model(
                name=name, python_model=ImageClassifier(), artifacts=artifacts,
                signature=ModelSignature(inputs=None, outputs=outputs), input_example=example,
                code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements(),
                metadata={"input": INPUT_DESCRIPTION, **{k: v for k, v in spec.items() if k != "classes"}})
    return info.model_uri
