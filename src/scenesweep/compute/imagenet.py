"""The full network (VGG16 in the study) with its ImageNet head: top-k ImageNet classes of image files (study Q3).

The network is ``backbone.build_backbone`` with its original pooling and fc layers, and the
preprocessing is the weights' own transform (``backbone.preprocessing``). Class names come from
torchvision's weights metadata (``VGG16_Weights.IMAGENET1K_V1.meta["categories"]``), so nothing
is hand-copied.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from . import backbone
from ..core.config import FC_WIDTH_PRETRAINED, PARAMETER_BY_NAME
from ..core.errors import ConfigError
from .data import DataError, read_image

N_IMAGENET_CLASSES = 1000
BATCH_SIZE = 8  # beyond 8 images at 224 px nothing is gained on 2 cores


def imagenet_categories(arch: str = "vgg16") -> list[str]:
    """The 1000 ImageNet class names, in the order of the network's outputs."""
    return list(torchvision.models.get_model_weights(arch).IMAGENET1K_V1.meta["categories"])


def top_classes(paths: list[str | os.PathLike], weights: str = "imagenet", arch: str = "vgg16",
                image_size: int = 224, top: int = 5, seed: int = 0) -> list[list[tuple[int, str, float]]]:
    """The ``top`` most probable ImageNet classes of each image, by the full network.

    Args:
        paths: image files (JPEG, PNG, ...; grayscale is repeated to 3 channels).
        weights: "imagenet" (torchvision's IMAGENET1K_V1, from TORCH_HOME), "random" (seeded
            initialisation) or a state_dict file of the same architecture.
        arch: a registered architecture, e.g. "vgg16" or "resnet50".
        image_size: input side in pixels after resize and centre crop (224 natively).
        top: how many classes per image, 1 to 1000.
        seed: seed of the random initialisation (weights="random").

    Returns:
        One list per image, most probable first, of (class index, class name, probability).

    Raises:
        ConfigError: a bad arch, image size or ``top``.
        DataError: a missing or unreadable image file (named).
        WeightsError: weights that cannot be found or do not fit ``arch``.
    """
    arch = PARAMETER_BY_NAME["arch"].convert(arch)
    image_size = PARAMETER_BY_NAME["image_size"].convert(image_size)
    try:
        top = int(top)
    except (TypeError, ValueError):
        raise ConfigError(f"top={top!r}: expected an integer from 1 to {N_IMAGENET_CLASSES}") from None
    if not 1 <= top <= N_IMAGENET_CLASSES:
        raise ConfigError(f"top={top!r}: expected an integer from 1 to {N_IMAGENET_CLASSES}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no image files given")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: image file not found")
    backbone.weights_identity(str(weights), arch, seed)  # a missing weights file fails here, named

    transform = backbone.preprocessing(arch, image_size)
    pixels = [transform(read_image(path)) for path in paths]  # each (3, S, S), decoded before any compute
    model = backbone.build_backbone(arch, str(weights), None, FC_WIDTH_PRETRAINED, seed, image_size)
    model = model.to(memory_format=torch.channels_last)  # oneDNN's fastest convolutions
    names = imagenet_categories(arch)
    found = []
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH_SIZE):
            x = torch.stack(pixels[start:start + BATCH_SIZE]).contiguous(memory_format=torch.channels_last)
            probabilities = torch.softmax(model(x).float(), dim=1)  # (B, 3, S, S) -> (B, 1000)
            values, indices = probabilities.topk(top, dim=1)  # (B, top) each, most probable first
            for row_values, row_indices in zip(values.tolist(), indices.tolist()):
                found.append([(index, names[index], value) for index, value in zip(row_indices, row_values)])
    return found
