"""Backbones: torchvision classifiers split into an expensive trunk and cheap feature taps.

Each family of ``core/backbone_families.py`` is implemented once, under its name, in ``family_code.py``
(``FAMILY_CODE``); the rest of the package calls this module's functions:
  * ``trunk_forward(model, x)``: (N, 3, S, S) -> the trunk's output (VGG: (N, 512, S/32, S/32);
    ResNet-50: (N, 2048, S/32, S/32); ViT: (N, 768)). Expensive; what the feature cache stores.
  * ``from_trunk(model, out, layer)``: a feature tap from it, (N, D) float32. Cheap beside the
    trunk, recomputed from the cache (VGG: adaptive pool to 7x7, pool5, fc6 .. relu7; others:
    the global pooling, which a pooling type replaces, and what their classifier reads before
    its last Linear).
The rest of the package calls these functions and never asks which family a network is.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn

from ..core.backbone_families import family_of
from ..core.config import FC_WIDTH_PRETRAINED
from ..core.errors import ConfigError
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from .family_code import FAMILY_CODE, WINDOW_POOLINGS, GlobalPool, PoolingBranches, code_of  # noqa: F401
from .layer_tables import LayerRow, format_layer_table  # noqa: F401  (the Q1 table's callers come here)
from .precision import PRECISION_DTYPES
# The weights and their transform, for the callers of this module (``backbone.preprocessing``, ...).
from .weights import (WeightsError, imagenet_checkpoint, imagenet_weights, load_state_dict,  # noqa: F401
                      preprocessing, transform_identity, weights_identity)


def layer_width(arch: str, layer: str, fc_width: int = FC_WIDTH_PRETRAINED) -> int:
    """Width of a feature layer of ``arch`` (VGG's fc layers: ``fc_width``)."""
    family = family_of(arch)
    if layer not in family.taps:
        raise ConfigError(f"layer={layer!r}: {arch} has the feature layers {', '.join(family.taps)}")
    return family.tap_width(arch, layer, fc_width)


def check_weights(arch: str, weights: str, image_size: int = 224) -> None:
    """Load ``weights`` into ``arch`` on the meta device: a check before any run starts.

    Nothing is computed or copied (the file is memory-mapped, tensors assigned to a model on
    the meta device), but a missing file, a file that is not a state_dict or one that does not
    fit the network fails here, with the same message a run would give later.

    Raises:
        WeightsError: saying what is wrong and how to provide the weights.
    """
    weights_identity(weights, arch, 0)
    if weights == "random":
        return
    code = FAMILY_CODE[family_of(arch).name]
    with torch.device("meta"):
        model = code.construct(arch, image_size)
    load_state_dict(model, weights, arch, lambda state: code.adapt_state(model, state), assign=True)


def build_backbone(arch: str = "vgg16", weights: str = "random", pooling: str | None = None,
                   fc_width: int = FC_WIDTH_PRETRAINED, seed: int = 0, image_size: int = 224) -> nn.Module:
    """torchvision's ``arch`` with its pooling swapped (and VGG's fc6/fc7 widened), in eval mode.

    Args:
        arch: a registered architecture, e.g. "vgg16", "resnet50" (``core/backbone_families.py``).
        weights: "imagenet", "random" (torchvision's initialisation, seeded) or a state_dict path.
        pooling: a pooling type the family takes (None: its own); VGG: every max-pool is
            replaced by it; others: the global pooling.
        fc_width: VGG's width of fc6 and fc7. Other than 4096, fc6/fc7/fc8 are new layers with
            PyTorch's default initialisation, seeded: untrained, as in the study (Q12.1).
        seed: seed of the random initialisation.
        image_size: the input side (ViT's position embedding depends on it; others ignore it).
    """
    family = family_of(arch)
    pooling = pooling or family.own_pooling
    if pooling not in family.poolings:
        raise ConfigError(f"pooling={pooling!r}: {arch} takes the poolings {', '.join(family.poolings)}")
    code = FAMILY_CODE[family.name]
    torch.manual_seed(seed)
    if weights == "random":
        model = code.construct(arch, image_size)
    else:
        model = loaded(code, arch, weights, image_size)
    if pooling != family.own_pooling:
        code.swap_pooling(model, pooling)
    if fc_width != FC_WIDTH_PRETRAINED:
        torch.manual_seed(seed + 1_000_003)  # independent of the conv init, same for any weights
        code.widen(model, fc_width)
    return model.eval()


def loaded(code, arch: str, weights: str, image_size: int) -> nn.Module:
    """``arch`` holding ``weights``: built on the meta device, then given the file's tensors, so that
    no random initialisation is drawn only to be overwritten (VGG16: 138 M numbers, about 1.4 s
    of one core)."""
    with torch.device("meta"):
        model = code.construct(arch, image_size)
    load_state_dict(model, weights, arch, lambda state: code.adapt_state(model, state), assign=True, mmap=False)
    # Every parameter and buffer came from the file (the keys were checked equal); fp32 as a
    # copy into torchvision's own parameters would have made them, whatever the file stored.
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), f"{arch}: a tensor not in its state_dict"
    return model.float()


def build_configured(config) -> nn.Module:
    """``build_backbone`` with a run's own settings (a ``RunConfig``'s arch, weights, pooling,
    fc_width, seed and image_size): the one place they are spelled out in order."""
    return build_backbone(config.arch, config.weights, config.pooling, config.fc_width, config.seed, config.image_size)


def architecture(arch: str = "vgg16", pooling: str | None = None, fc_width: int = FC_WIDTH_PRETRAINED,
                 image_size: int = 224) -> nn.Module:
    """The network's structure without weights (on the meta device): for tables and shapes."""
    with torch.device("meta"):
        return build_backbone(arch, "random", pooling, fc_width, image_size=image_size)


def trunk(model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
    """The expensive part as a module; with ``poolings`` (VGG), one output per pooling type
    from a shared start (``PoolingBranches``)."""
    return code_of(model).trunk(model, poolings)


def trunk_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> the trunk's output (VGG16: (N, 512, S/32, S/32); ViT: (N, 768))."""
    return trunk(model)(images)


def from_trunk(model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
    """Feature layer ``layer`` from the trunk's output, in eval mode (dropout off), as float32:
    (N, D) with D = ``layer_width``."""
    code = code_of(model)
    if layer not in code.family.taps:
        raise ConfigError(f"layer={layer!r}: expected one of {', '.join(code.family.taps)}")
    return code.tap(model, out, layer).float()


def tap_state_keys(model: nn.Module, layer: str, state_keys: Iterable[str] | None = None) -> list[str]:
    """The parameters and buffers ``layer`` needs: the trunk's and the tap's (VGG: fc6 / fc7 as
    required; never the ImageNet classifier)."""
    prefixes = code_of(model).kept_prefixes(layer)
    keys = model.state_dict().keys() if state_keys is None else state_keys
    return [key for key in keys if key.startswith(prefixes)]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a resolved precision computes in ('bf16' -> bfloat16; 'fp32' -> float32)."""
    return PRECISION_DTYPES[precision]


def to_inference(model: nn.Module, device: torch.device, precision: str, layer: str | None = None) -> nn.Module:
    """The network set up for extraction (features, serving): the trunk in the precision's dtype
    and channels_last (whole-model bf16 beats autocast on CPU, which re-casts the weights every
    call; channels_last lets oneDNN pick its fastest convolutions), and the modules ``layer``
    needs after it (with None: all of the family's taps) on the device in the same dtype, in
    eval mode."""
    code = code_of(model)
    dtype = compute_dtype(precision)
    code.trunk(model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for tap in ((layer,) if layer is not None else code.family.taps):
        for module in code.tap_modules(model, tap):
            module.to(device=device, dtype=dtype)
    return model.eval()


def first_conv(model: nn.Module) -> nn.Sequential:
    """The first convolution and its activation (VGG: conv1_1 + ReLU; ResNet: conv1, bn1, ReLU)."""
    return code_of(model).first_conv(model).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_structure(arch: str, pooling: str | None = None, fc_width: int = FC_WIDTH_PRETRAINED,
                     image_size: int = 224) -> nn.Module:
    """The network's structure on the meta device, built once per setting in a process and shared
    by whoever reads it (parameter counts, stored bytes, the layer table): read it, never change
    it. The layer is not part of the key: every layer of a setting reads the same structure."""
    return _shared_structure(arch, pooling or family_of(arch).own_pooling, fc_width,
                             image_size if family_of(arch).patch > 1 else 224)  # only ViT's size changes it


@functools.lru_cache(maxsize=16)
def _shared_structure(arch: str, pooling: str, fc_width: int, image_size: int) -> nn.Module:
    return architecture(arch, pooling, fc_width, image_size)


def backbone_facts(arch: str, layer: str, pooling: str | None = None, fc_width: int = FC_WIDTH_PRETRAINED,
                   image_size: int = 224) -> dict[str, str | int | float]:
    """What a run records of its backbone, for comparing backbones: its family, parameter count
    (the whole network as built), feature width, and the ImageNet top-1 accuracy torchvision
    reports for its IMAGENET1K_V1 weights (Kornblith et al. set transfer against it). The count
    reads the shared structure: no network is built per trial."""
    meta = imagenet_weights(arch).meta
    return {"backbone.family": family_of(arch).name,
            "backbone.params": parameter_count(shared_structure(arch, pooling, fc_width, image_size)),
            "backbone.feature_dim": layer_width(arch, layer, fc_width),
            "backbone.imagenet_top1": float(meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1", float("nan")))}


def setting_layer_table(config) -> list[LayerRow]:
    """Q1's table of a run's network (``config``: a RunConfig; its arch, pooling, fc width and
    image size): the one way the drivers ask for it."""
    model = shared_structure(config.arch, config.pooling, config.fc_width, config.image_size)
    return layer_table(model, config.image_size)


def layer_table(model: nn.Module, image_size: int = 224) -> list[LayerRow]:
    """Q1: the network's layers with channels, weight and bias counts, output size (VGG: every
    conv, pool and fc layer, as the study has it; others: their stages, in forward order)."""
    return code_of(model).layer_rows(model, image_size)
