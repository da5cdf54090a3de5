"""Study Q4: the maps after the first convolution (VGG: the 64 of conv1_1 + ReLU) for given images.

The study looks at these maps raw and thresholded at 2 (some fire on eyes and nose, others on
edges). Plain functions returning arrays; plotting and logging live with the experiment runner.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch

from . import backbone
from .data import read_image
from .hardware import resolve_device

DEFAULT_THRESHOLD = 2.0  # the study's threshold


@dataclasses.dataclass(frozen=True)
class FeatureMaps:
    """First-convolution maps of a batch of images.

    Attributes:
        inputs: (N, S, S, 3) float32 in [0, 1], each image as the network saw it (resized and
            centre-cropped, before ImageNet normalisation): what to show beside the maps.
        maps: (N, 64, S, S) float32, ReLU(conv1_1(x)); conv1_1 has padding 1, so S is kept.
        threshold: the threshold of ``thresholded``.
        thresholded: (N, 64, S, S) bool, ``maps > threshold``.
    """

    inputs: np.ndarray
    maps: np.ndarray
    threshold: float
    thresholded: np.ndarray

    def active_fraction(self) -> np.ndarray:
        """(N, 64): fraction of each map's pixels above the threshold."""
        return self.thresholded.mean(axis=(2, 3))


def first_conv_maps(paths: Sequence[str | os.PathLike], weights: str = "imagenet", arch: str = "vgg16",
                    image_size: int = 224, threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                    device: str = "auto") -> FeatureMaps:
    """ReLU(conv1_1) of each image, raw and thresholded.

    Args:
        paths: image files (grayscale is repeated to 3 channels, as everywhere else).
        weights: "imagenet", "random" (seeded) or a state_dict file, as for the backbone.
        arch: a registered architecture (its first convolution: ``backbone.first_conv``).
        image_size: input side; the weights' own preprocessing (resize, centre crop, normalise).
        threshold: a map pixel counts as "firing" above this value (the study used 2).
        seed: seed of random weights.
        device: "auto", "cpu" or "cuda".

    Raises:
        DataError: an image that cannot be read (naming it).
        WeightsError: weights that cannot be found or do not fit.
    """
    if not paths:
        raise ValueError("expected at least one image")
    transform = backbone.preprocessing(arch, image_size)
    # Only conv1_1 is needed, but its weights come from the full checkpoint: build the whole
    # network once (fc widths and pooling do not touch the first layer).
    model = backbone.build_backbone(arch, weights, seed=seed, image_size=image_size)
    layer = backbone.first_conv(model).to(resolve_device(device))
    del model
    batch = torch.stack([transform(read_image(path)) for path in paths])  # (N, 3, S, S), normalised
    with torch.inference_mode():
        maps = layer(batch.to(next(layer.parameters()).device)).float().cpu().numpy()  # (N, 64, S, S)
    # Undo the ImageNet normalisation for display: x * std + mean, (N, 3, S, S) -> (N, S, S, 3).
    mean = np.asarray(transform.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(transform.std, dtype=np.float32)[None, :, None, None]
    inputs = np.clip(batch.numpy() * std + mean, 0.0, 1.0).transpose(0, 2, 3, 1)
    return FeatureMaps(inputs=inputs.astype(np.float32), maps=maps, threshold=float(threshold),
                       thresholded=maps > threshold)
