"""Backbone weights and the transform they expect: torchvision's ImageNet weights (from the local
cache, never fetched when SCENESWEEP_OFFLINE is set), seeded random ones, or a state_dict file;
what identifies them in cache keys; their preprocessing.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..core.errors import UserError, first_line


class WeightsError(UserError):
    """Backbone weights cannot be found or do not fit; the message says how to provide them."""


def imagenet_weights(arch: str):
    """torchvision's ImageNet weights enum of ``arch`` (its URL, transform and reported accuracy)."""
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def preprocessing(arch: str = "vgg16", image_size: int = 224) -> ImageClassification:
    """The torchvision weights' own transform (resize, centre crop, ImageNet normalisation).

    At the weights' native 224 it is exactly ``<Arch>_Weights.IMAGENET1K_V1.transforms()``
    (VGG16: resize 256, crop 224, bilinear; ConvNeXt: 236; EfficientNet: bicubic); other sizes
    keep the same resize-to-crop ratio.
    """
    weights = imagenet_weights(arch)
    native = weights.transforms()
    resize = int(round(image_size * native.resize_size[0] / native.crop_size[0]))
    return weights.transforms(crop_size=image_size, resize_size=resize, interpolation=native.interpolation)


def transform_identity(arch: str) -> str:
    """What the cache key says of the transform (the image size is a key part of its own)."""
    native = imagenet_weights(arch).transforms()
    interpolation = "" if native.interpolation == InterpolationMode.BILINEAR else f"-{native.interpolation.value}"
    return (f"torchvision-ImageClassification-resize{native.resize_size[0]}/{native.crop_size[0]}"
            f"{interpolation}-crop-imagenet-norm")


def imagenet_checkpoint(arch: str = "vgg16") -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights file."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def weights_identity(weights: str, arch: str, seed: int) -> str:
    """A string that changes whenever the backbone's parameters would."""
    if weights == "imagenet":
        return f"{arch}:IMAGENET1K_V1"
    if weights == "random":
        return f"{arch}:random:seed={seed}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights={weights!r}: expected 'imagenet', 'random' or a state_dict file; "
                           f"{path} not found")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{arch}:file:sha256={digest.hexdigest()}"


def weights_file(weights: str, arch: str) -> str:
    """The file ``weights`` names: torchvision's ImageNet checkpoint for ``arch`` (downloaded into
    torch's hub cache when missing, unless SCENESWEEP_OFFLINE is set), or the path given."""
    if weights != "imagenet":
        return weights
    checkpoint = imagenet_checkpoint(arch)
    if not checkpoint.is_file():
        if os.environ.get("SCENESWEEP_OFFLINE", "") not in ("", "0"):
            raise WeightsError(
                f"weights=imagenet: {checkpoint} not found and SCENESWEEP_OFFLINE is set. "
                f"Copy torchvision's file {checkpoint.name} there (TORCH_HOME moves it), "
                "or save a state_dict and pass weights=<path>.")
        try:
            torch.hub.load_state_dict_from_url(imagenet_weights(arch).url, progress=True)
        except Exception as error:  # any network failure: say how to provide the file
            raise WeightsError(
                f"weights=imagenet: could not download {checkpoint.name} ({error.__class__.__name__}). "
                f"On a connected machine run `python -c \"import torchvision; "
                f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\"` and copy {checkpoint.name} to "
                f"{checkpoint.parent}/ (TORCH_HOME moves it), or pass weights=<state_dict file>.") from None
    return str(checkpoint)


def load_state_dict(model: nn.Module, weights: str, arch: str, adapt_state: Callable[[dict], dict],
                    assign: bool = False, mmap: bool | None = None) -> None:
    """Load ``weights`` ("imagenet" or a state_dict file) into ``model`` (``arch``), ``adapt_state``
    first (a family's renames of older checkpoints' keys); any mismatch is one WeightsError.

    ``assign``: the loaded tensors become the model's (a model on the meta device has no storage
    to copy into). ``mmap`` (default: ``assign``): the file is memory-mapped, read only where
    touched; a check wants that, a network that computes does not (a file rewritten in place
    under a mapping changes or faults the weights)."""
    source = weights_file(weights, arch)
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights={weights!r}: expected 'imagenet', 'random' or a state_dict file; {path} not found")
    try:
        try:
            # mmap: a check reads only what it needs of a 528 MB file (zip-format files only).
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=assign if mmap is None else mmap)
        except RuntimeError:
            if not (assign if mmap is None else mmap):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = first_line(error)
        raise WeightsError(f"weights={weights!r}: not a torch state_dict file "
                           f"({error.__class__.__name__}{': ' + first if first else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict):
        state = adapt_state(state)
    if not isinstance(state, dict):
        raise WeightsError(f"weights={source}: holds a {type(state).__name__}, not a state_dict of torchvision {arch}")
    expected, given = set(model.state_dict()), set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise WeightsError(f"weights={source}: does not fit torchvision {arch} ({len(missing)} missing keys"
                           f"{' e.g. ' + missing[0] if missing else ''}, {len(unexpected)} unexpected"
                           f"{' e.g. ' + unexpected[0] if unexpected else ''})")
    try:
        model.load_state_dict(state, assign=assign)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        # "Error(s) in loading state_dict for VGG:" then one line per mismatch: show the first.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else "")[:300]
        raise WeightsError(f"weights={source}: does not fit torchvision {arch} ({detail})") from None
