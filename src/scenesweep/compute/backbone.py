"""Backbones: torchvision classifiers split into an expensive trunk and cheap feature taps.

Each family of ``core/backbones.py`` is implemented here once, under its name (``FAMILY_CODE``):
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

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..core.backbones import FAMILY_BY_NAME, BackboneFamily, family_of
from ..core.config import FC_WIDTH_PRETRAINED
from ..core.errors import ConfigError, UserError, first_line
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)

# VGG's pooling types: name -> factory of the module that replaces each 2x2/stride-2 max-pool.
WINDOW_POOLINGS = {
    "max": lambda: nn.MaxPool2d(kernel_size=2, stride=2),
    "avg": lambda: nn.AvgPool2d(kernel_size=2, stride=2),
    # LPPool2d(p=1) sums each 2x2 window: the study's "sum" pooling.
    "lp1": lambda: nn.LPPool2d(norm_type=1, kernel_size=2, stride=2),
    "lp2": lambda: nn.LPPool2d(norm_type=2, kernel_size=2, stride=2),
}
GEM_P = 3.0  # Radenovic et al.'s fixed p: frozen features, nothing would learn a p here


class GlobalPool(nn.Module):
    """One global pooling of a trunk's map: (N, C, h, w) -> (N, C, 1, 1), the shape of the
    ``AdaptiveAvgPool2d(1)`` it replaces (the classifier after it flattens or normalises)."""

    KINDS = ("avg", "max", "lp2", "gem")

    def __init__(self, kind: str):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"pooling={kind!r}: expected one of {', '.join(self.KINDS)}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean(dim=(2, 3), keepdim=True)
        if self.kind == "max":
            return x.amax(dim=(2, 3), keepdim=True)
        if self.kind == "lp2":
            return x.float().pow(2).sum(dim=(2, 3), keepdim=True).sqrt().to(x.dtype)
        # GeM: (mean of x^p)^(1/p) over positive values (a map after SiLU or before LayerNorm
        # may dip below 0), in fp32: x^3 of bf16 values loses what the mean needs.
        return x.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3), keepdim=True).pow(1.0 / GEM_P).to(x.dtype)

    def extra_repr(self) -> str:
        return self.kind


def layer_width(arch: str, layer: str, fc_width: int = FC_WIDTH_PRETRAINED) -> int:
    """Width of a feature layer of ``arch`` (VGG's fc layers: ``fc_width``)."""
    family = family_of(arch)
    if layer not in family.taps:
        raise ConfigError(f"layer={layer!r}: {arch} has the feature layers {', '.join(family.taps)}")
    return family.tap_width(arch, layer, fc_width)


class WeightsError(UserError):
    """Backbone weights cannot be found or do not fit; the message says how to provide them."""


def _imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def preprocessing(arch: str = "vgg16", image_size: int = 224) -> ImageClassification:
    """The torchvision weights' own transform (resize, centre crop, ImageNet normalisation).

    At the weights' native 224 it is exactly ``<Arch>_Weights.IMAGENET1K_V1.transforms()``
    (VGG16: resize 256, crop 224, bilinear; ConvNeXt: 236; EfficientNet: bicubic); other sizes
    keep the same resize-to-crop ratio.
    """
    weights = _imagenet_weights(arch)
    native = weights.transforms()
    resize = int(round(image_size * native.resize_size[0] / native.crop_size[0]))
    return weights.transforms(crop_size=image_size, resize_size=resize, interpolation=native.interpolation)


def transform_identity(arch: str) -> str:
    """What the cache key says of the transform (the image size is a key part of its own)."""
    native = _imagenet_weights(arch).transforms()
    interpolation = "" if native.interpolation == InterpolationMode.BILINEAR else f"-{native.interpolation.value}"
    return (f"torchvision-ImageClassification-resize{native.resize_size[0]}/{native.crop_size[0]}"
            f"{interpolation}-crop-imagenet-norm")


def imagenet_checkpoint(arch: str = "vgg16") -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights file."""
    url = _imagenet_weights(arch).url
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


def _load_state_dict(model: nn.Module, weights: str, arch: str, assign: bool = False) -> None:
    if weights == "imagenet":
        checkpoint = imagenet_checkpoint(arch)
        if not checkpoint.is_file():
            if os.environ.get("SCENESWEEP_OFFLINE", "") not in ("", "0"):
                raise WeightsError(
                    f"weights=imagenet: {checkpoint} not found and SCENESWEEP_OFFLINE is set. "
                    f"Copy torchvision's file {checkpoint.name} there (TORCH_HOME moves it), "
                    "or save a state_dict and pass weights=<path>.")
            try:
                torch.hub.load_state_dict_from_url(_imagenet_weights(arch).url, progress=True)
            except Exception as error:  # any network failure: say how to provide the file
                raise WeightsError(
                    f"weights=imagenet: could not download {checkpoint.name} ({error.__class__.__name__}). "
                    f"On a connected machine run `python -c \"import torchvision; "
                    f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\"` and copy {checkpoint.name} to "
                    f"{checkpoint.parent}/ (TORCH_HOME moves it), or pass weights=<state_dict file>.") from None
        source = str(checkpoint)
    else:
        source = weights
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights={weights!r}: expected 'imagenet', 'random' or a state_dict file; {path} not found")
    try:
        try:
            # mmap: a check reads only what it needs of a 528 MB file (zip-format files only).
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=assign)
        except RuntimeError:
            if not assign:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = first_line(error)
        raise WeightsError(f"weights={weights!r}: not a torch state_dict file "
                           f"({error.__class__.__name__}{': ' + first if first else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict):
        state = _code_of(model).adapt_state(model, state)
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
    _load_state_dict(model, weights, arch, assign=True)


class FamilyCode:
    """How one family's torchvision networks are split into trunk and taps (the default: a trunk
    ``features`` followed by ``avgpool``, which a pooling type replaces; the tap ``pool`` is the
    pooled map flattened). A family overrides what differs."""

    name: str = ""
    model_class: type = nn.Module

    @property
    def family(self) -> BackboneFamily:
        return FAMILY_BY_NAME[self.name]

    def construct(self, arch: str, image_size: int) -> nn.Module:
        """torchvision's network of ``arch`` with its own initialisation, no weights loaded."""
        return torchvision.models.get_model(arch, weights=None)

    def adapt_state(self, model: nn.Module, state: dict) -> dict:
        """A state_dict made to fit ``model`` where the family allows it (ViT: another size)."""
        return state

    def swap_pooling(self, model: nn.Module, pooling: str) -> None:
        model.avgpool = GlobalPool(pooling)

    def widen(self, model: nn.Module, fc_width: int) -> None:
        raise ConfigError(f"fc_width={fc_width}: {type(model).__name__} has no fc6/fc7 to widen (VGG only)")

    def trunk(self, model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
        """(N, 3, S, S) -> the trunk's output; with ``poolings`` (a family that pools inside its
        trunk), one output per pooling type."""
        return model.features

    def tap_modules(self, model: nn.Module, layer: str) -> list[nn.Module]:
        """The modules after the trunk that ``layer`` runs (with weights: set up for inference)."""
        return [model.avgpool]

    def tap(self, model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
        """(N, C, h, w) -> (N, C): the global pooling, flattened."""
        return torch.flatten(model.avgpool(out), 1)

    def kept_prefixes(self, layer: str) -> tuple[str, ...]:
        """State-dict key prefixes of what ``layer`` needs (a served model stores only these)."""
        return ("features.",)

    def first_conv(self, model: nn.Module) -> nn.Sequential:
        """The first convolution and what follows it up to its activation (study Q4)."""
        return model.features[0]

    def table_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The network's parts, in forward order, for the layer table (``features`` by stage)."""
        parts = []
        for name, module in model.named_children():
            if name == "features" and isinstance(module, nn.Sequential):
                parts += [(f"features.{index}", stage) for index, stage in enumerate(module)]
            else:
                parts.append((name, module))
        return parts

    def layer_rows(self, model: nn.Module, image_size: int) -> list["LayerRow"]:
        return stage_table(model, self.table_modules(model), image_size)


class VggCode(FamilyCode):
    """VGG: ``features`` (13 or so convolutions, 5 max-pools) then adaptive pool to 7x7, pool5
    (25088), and the classifier [fc6, relu6, dropout, fc7, relu7, dropout, fc8]."""

    name = "vgg"
    model_class = torchvision.models.VGG
    FC6, FC7 = 0, 3
    # Which classifier modules each feature layer needs.
    LAYER_FC_MODULES = {"pool5": (), "fc6": (FC6,), "relu6": (FC6,), "fc7": (FC6, FC7), "relu7": (FC6, FC7)}

    def swap_pooling(self, model: nn.Module, pooling: str) -> None:
        for index, module in enumerate(model.features):
            if isinstance(module, nn.MaxPool2d):
                model.features[index] = WINDOW_POOLINGS[pooling]()

    def widen(self, model: nn.Module, fc_width: int) -> None:
        # New fc6/fc7/fc8 with PyTorch's default initialisation: untrained, as in the study (Q12.1).
        model.classifier[0] = nn.Linear(512 * 7 * 7, fc_width)
        model.classifier[3] = nn.Linear(fc_width, fc_width)
        model.classifier[6] = nn.Linear(fc_width, 1000)

    def trunk(self, model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
        return PoolingBranches(model.features, poolings) if poolings else model.features

    def tap_modules(self, model: nn.Module, layer: str) -> list[nn.Module]:
        return [model.avgpool, *(model.classifier[index] for index in self.LAYER_FC_MODULES[layer])]

    def tap(self, model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
        """(N, 512, h, w) -> pool5 (N, 25088) -> fc6/relu6/fc7/relu7 (N, fc_width); fc6 and fc7
        run in their weights' dtype (the extraction precision)."""
        x = torch.flatten(model.avgpool(out), 1)  # adaptive pool to 7x7: (N, 512*7*7)
        if layer == "pool5":
            return x
        fc6, fc7 = model.classifier[self.FC6], model.classifier[self.FC7]
        x = fc6(x.to(fc6.weight.dtype))
        if layer != "fc6":
            x = torch.relu(x)
        if layer in ("fc7", "relu7"):
            x = fc7(x)
        if layer == "relu7":
            x = torch.relu(x)
        return x

    def kept_prefixes(self, layer: str) -> tuple[str, ...]:
        return ("features.", *(f"classifier.{index}." for index in self.LAYER_FC_MODULES[layer]))

    def first_conv(self, model: nn.Module) -> nn.Sequential:
        return nn.Sequential(model.features[0], model.features[1])  # conv1_1 and its ReLU

    def layer_rows(self, model: nn.Module, image_size: int) -> list["LayerRow"]:
        return vgg_layer_table(model, image_size)  # the study's Q1 table


class ResNetCode(FamilyCode):
    """ResNet: conv1 .. layer4 (N, C, S/32, S/32), then ``avgpool`` and ``fc``."""

    name = "resnet"
    model_class = torchvision.models.ResNet
    STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def trunk(self, model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
        return nn.Sequential(*(getattr(model, stage) for stage in self.STAGES))

    def tap(self, model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
        if layer == "layer4":  # (N, C, h, w) -> (N, C, 2, 2) -> (N, 4C): the coarse layout kept
            return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 2), 1)
        return torch.flatten(model.avgpool(out), 1)

    def kept_prefixes(self, layer: str) -> tuple[str, ...]:
        return ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")

    def first_conv(self, model: nn.Module) -> nn.Sequential:
        return nn.Sequential(model.conv1, model.bn1, model.relu)

class ConvNeXtCode(FamilyCode):
    """ConvNeXt: ``features`` (N, 768, S/32, S/32), ``avgpool``, then the classifier
    [LayerNorm2d, Flatten, Linear]: the tap ``pool`` is the pooled map after its LayerNorm."""

    name = "convnext"
    model_class = torchvision.models.ConvNeXt

    def tap_modules(self, model: nn.Module, layer: str) -> list[nn.Module]:
        return [model.avgpool, model.classifier[0]]

    def tap(self, model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
        norm = model.classifier[0]
        return torch.flatten(norm(model.avgpool(out).to(norm.weight.dtype)), 1)  # (N, 768, 1, 1) -> (N, 768)

    def kept_prefixes(self, layer: str) -> tuple[str, ...]:
        return ("features.", "classifier.0.")


class EfficientNetCode(FamilyCode):
    """EfficientNet: ``features`` (N, 1280, S/32, S/32), ``avgpool``, [Dropout, Linear]."""

    name = "efficientnet"
    model_class = torchvision.models.EfficientNet


class ViTTrunk(nn.Module):
    """ViT up to its class token: (N, 3, S, S) -> patches (N, S/16 * S/16, 768), the class token
    prepended, the encoder (its last LayerNorm included) -> the class token (N, 768).

    It holds the patch embedding, the class token and the encoder, not the ImageNet head (which a
    served model does not store): moved to a device or dtype, it moves only what it runs.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj, self.encoder, self.class_token = vit.conv_proj, vit.encoder, vit.class_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(x)  # (N, 768, S/16, S/16)
        tokens = patches.flatten(2).transpose(1, 2)  # (N, P, 768), torchvision's _process_input
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (N, 1+P, 768)
        return self.encoder(tokens)[:, 0]


class ViTCode(FamilyCode):
    """ViT-B/16: the trunk ends at the class token (nearly all the compute); the tap is it."""

    name = "vit"
    model_class = torchvision.models.VisionTransformer

    def construct(self, arch: str, image_size: int) -> nn.Module:
        # The position embedding has one row per patch: the network is built for its input size.
        return torchvision.models.get_model(arch, weights=None, image_size=image_size)

    def adapt_state(self, model: nn.Module, state: dict) -> dict:
        from torchvision.models.vision_transformer import interpolate_embeddings

        key = "encoder.pos_embedding"
        if key in state and hasattr(state[key], "shape") and state[key].shape != model.encoder.pos_embedding.shape:
            # ImageNet's 224 px embedding (1, 197, 768) resized (bicubic) to this input's patches.
            return interpolate_embeddings(model.image_size, model.patch_size, dict(state))
        return state

    def swap_pooling(self, model: nn.Module, pooling: str) -> None:
        pass  # "token" only: the class token is ViT's own summary

    def trunk(self, model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
        return ViTTrunk(model)

    def tap_modules(self, model: nn.Module, layer: str) -> list[nn.Module]:
        return []

    def tap(self, model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
        return out

    def kept_prefixes(self, layer: str) -> tuple[str, ...]:
        return ("class_token", "conv_proj.", "encoder.")

    def first_conv(self, model: nn.Module) -> nn.Sequential:
        return nn.Sequential(model.conv_proj)  # the 16x16/stride-16 patch embedding

    def table_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("conv_proj", model.conv_proj), *model.encoder.named_children(), ("heads", model.heads)]


FAMILY_CODE: dict[str, FamilyCode] = {code.name: code for code in
                                      (VggCode(), ResNetCode(), ConvNeXtCode(), EfficientNetCode(), ViTCode())}
assert set(FAMILY_CODE) == set(FAMILY_BY_NAME), set(FAMILY_CODE) ^ set(FAMILY_BY_NAME)


def _code_of(model: nn.Module) -> FamilyCode:
    for code in FAMILY_CODE.values():
        if isinstance(model, code.model_class):
            return code
    raise TypeError(f"{type(model).__name__} is not a registered backbone family")


def family_poolings(arch: str) -> tuple[str, ...]:
    return family_of(arch).poolings


def build_backbone(arch: str = "vgg16", weights: str = "random", pooling: str | None = None,
                   fc_width: int = FC_WIDTH_PRETRAINED, seed: int = 0, image_size: int = 224) -> nn.Module:
    """torchvision's ``arch`` with its pooling swapped (and VGG's fc6/fc7 widened), in eval mode.

    Args:
        arch: a registered architecture, e.g. "vgg16", "resnet50" (``core/backbones.py``).
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
    model = code.construct(arch, image_size)
    if weights != "random":
        _load_state_dict(model, weights, arch)
    if pooling != family.own_pooling:
        code.swap_pooling(model, pooling)
    if fc_width != FC_WIDTH_PRETRAINED:
        torch.manual_seed(seed + 1_000_003)  # independent of the conv init, same for any weights
        code.widen(model, fc_width)
    return model.eval()


def architecture(arch: str = "vgg16", pooling: str | None = None, fc_width: int = FC_WIDTH_PRETRAINED,
                 image_size: int = 224) -> nn.Module:
    """The network's structure without weights (on the meta device): for tables and shapes."""
    with torch.device("meta"):
        return build_backbone(arch, "random", pooling, fc_width, image_size=image_size)


class PoolingBranches(nn.Module):
    """VGG's conv part for several pooling types at once: (N, 3, S, S) -> one (N, 512, S/32, S/32)
    per pooling.

    The pooling types differ only from the first pooling on: the layers before it (conv1_1,
    relu, conv1_2, relu: at 224 px about a third of VGG16's bf16 conv time) run once, then each
    branch runs the rest with its own pooling. The branches share the conv modules (the same
    weights: a pooling layer has none, and random weights are drawn before the swap).
    """

    def __init__(self, features: nn.Sequential, poolings: tuple[str, ...]):
        super().__init__()
        first = next(i for i, m in enumerate(features) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)))
        self.trunk = features[:first]
        self.branches = nn.ModuleList(
            nn.Sequential(*[WINDOW_POOLINGS[pooling]() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d))
                            else m for m in features[first:]])
            for pooling in poolings)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shared = self.trunk(x)  # (N, 64, S, S) at VGG's first block
        return tuple(branch(shared) for branch in self.branches)


def trunk(model: nn.Module, poolings: tuple[str, ...] = ()) -> nn.Module:
    """The expensive part as a module; with ``poolings`` (VGG), one output per pooling type
    from a shared start (``PoolingBranches``)."""
    return _code_of(model).trunk(model, poolings)


def trunk_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> the trunk's output (VGG16: (N, 512, S/32, S/32); ViT: (N, 768))."""
    return trunk(model)(images)


def from_trunk(model: nn.Module, out: torch.Tensor, layer: str) -> torch.Tensor:
    """Feature layer ``layer`` from the trunk's output, in eval mode (dropout off), as float32:
    (N, D) with D = ``layer_width``."""
    code = _code_of(model)
    if layer not in code.family.taps:
        raise ConfigError(f"layer={layer!r}: expected one of {', '.join(code.family.taps)}")
    return code.tap(model, out, layer).float()


def tap_state_keys(model: nn.Module, layer: str, state_keys: Iterable[str] | None = None) -> list[str]:
    """The parameters and buffers ``layer`` needs: the trunk's and the tap's (VGG: fc6 / fc7 as
    required; never the ImageNet classifier)."""
    prefixes = _code_of(model).kept_prefixes(layer)
    keys = model.state_dict().keys() if state_keys is None else state_keys
    return [key for key in keys if key.startswith(prefixes)]


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def to_inference(model: nn.Module, device: torch.device, precision: str, layer: str | None = None) -> nn.Module:
    """The network set up for extraction (features, serving): the trunk in the precision's dtype
    and channels_last (whole-model bf16 beats autocast on CPU, which re-casts the weights every
    call; channels_last lets oneDNN pick its fastest convolutions), and the modules ``layer``
    needs after it (with None: all of the family's taps) on the device in the same dtype, in
    eval mode."""
    code = _code_of(model)
    dtype = compute_dtype(precision)
    code.trunk(model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for tap in ((layer,) if layer is not None else code.family.taps):
        for module in code.tap_modules(model, tap):
            module.to(device=device, dtype=dtype)
    return model.eval()


def first_conv(model: nn.Module) -> nn.Sequential:
    """The first convolution and its activation (VGG: conv1_1 + ReLU; ResNet: conv1, bn1, ReLU)."""
    return _code_of(model).first_conv(model).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_facts(arch: str, layer: str, pooling: str | None = None, fc_width: int = FC_WIDTH_PRETRAINED,
                   image_size: int = 224) -> dict[str, str | int | float]:
    """See ``_backbone_facts``; counted once per architecture and setting in a process."""
    return dict(_backbone_facts(arch, layer, pooling, fc_width, image_size))


@functools.lru_cache(maxsize=64)
def _backbone_facts(arch: str, layer: str, pooling: str | None, fc_width: int,
                    image_size: int) -> dict[str, str | int | float]:
    """What a run records of its backbone, for comparing backbones: its family, parameter count
    (the whole network as built), feature width, and the ImageNet top-1 accuracy torchvision
    reports for its IMAGENET1K_V1 weights (Kornblith et al. set transfer against it)."""
    meta = _imagenet_weights(arch).meta
    return {"backbone.family": family_of(arch).name,
            "backbone.params": parameter_count(architecture(arch, pooling, fc_width, image_size)),
            "backbone.feature_dim": layer_width(arch, layer, fc_width),
            "backbone.imagenet_top1": float(meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1", float("nan")))}


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of the study's Q1 table."""

    index: int
    name: str
    kind: str
    in_channels: int
    out_channels: int
    weights: int
    biases: int
    output_size: str


def layer_table(model: nn.Module, image_size: int = 224) -> list[LayerRow]:
    """Q1: the network's layers with channels, weight and bias counts, output size (VGG: every
    conv, pool and fc layer, as the study has it; others: their stages, in forward order)."""
    return _code_of(model).layer_rows(model, image_size)


def _shape_text(shape: tuple[int, ...]) -> tuple[int, str]:
    """(channels or width, output size) of one part's output: (N, C, h, w), (N, T, D) or (N, D)."""
    if len(shape) == 4:
        return shape[1], f"{shape[2]} x {shape[3]}"
    if len(shape) == 3:
        return shape[2], f"{shape[1]} x {shape[2]}"
    return shape[-1], f"1 x {shape[-1]}"


def stage_table(model: nn.Module, parts: list[tuple[str, nn.Module]], image_size: int) -> list[LayerRow]:
    """One row per part (forward hooks on the meta device: nothing computed); parameters held by
    the network itself (ViT's class token) in a last row, so that the rows sum to the total."""
    seen: dict[str, tuple[int, str, int]] = {}
    handles = []
    for name, module in parts:
        def hook(module, inputs, output, name=name) -> None:
            channels_in = _shape_text(tuple(inputs[0].shape))[0] if inputs else 0
            channels_out, size = _shape_text(tuple(output.shape))
            seen[name] = (channels_in, size, channels_out)
        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    rows: list[LayerRow] = []
    for name, module in parts:
        weights = sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
        biases = sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))
        channels_in, size, channels_out = seen.get(name, (0, "-", 0))
        rows.append(LayerRow(len(rows) + 1, name, type(module).__name__, channels_in, channels_out, weights,
                             biases, size))
    listed = {id(p) for _, module in parts for p in module.parameters()}
    own = [(n, p) for n, p in model.named_parameters() if id(p) not in listed]
    if own:
        rows.append(LayerRow(len(rows) + 1, ", ".join(n for n, _ in own), "Parameter", 0, 0,
                             sum(p.numel() for n, p in own if not n.endswith("bias")),
                             sum(p.numel() for n, p in own if n.endswith("bias")), "-"))
    return rows


def vgg_layer_table(model: nn.Module, image_size: int = 224) -> list[LayerRow]:
    """The study's Q1 table: every conv, pool and fc layer of a VGG."""
    rows: list[LayerRow] = []
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    conv_index = 0
    block = 1
    with torch.inference_mode():
        for module in model.features:
            x = module(x)
            if isinstance(module, nn.Conv2d):
                conv_index += 1
                rows.append(LayerRow(len(rows) + 1, f"conv{block}_{conv_index}", "Convolution",
                                     module.in_channels, module.out_channels, module.weight.numel(),
                                     module.bias.numel(), f"{x.shape[2]} x {x.shape[3]}"))
            elif not isinstance(module, nn.ReLU):
                channels = x.shape[1]
                rows.append(LayerRow(len(rows) + 1, f"pool{block}", type(module).__name__, channels,
                                     channels, 0, 0, f"{x.shape[2]} x {x.shape[3]}"))
                block += 1
                conv_index = 0
        fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
        for number, module in zip((6, 7, 8), fcs):
            rows.append(LayerRow(len(rows) + 1, f"fc{number}", "Fully connected", module.in_features,
                                 module.out_features, module.weight.numel(), module.bias.numel(),
                                 f"1 x {module.out_features}"))
    return rows


def format_layer_table(rows: list[LayerRow]) -> str:
    """The Q1 table as Markdown, with the totals."""
    lines = ["| # | layer | type | in | out | weights | biases | output |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.index} | {r.name} | {r.kind} | {r.in_channels} | {r.out_channels} | "
                     f"{r.weights:,} | {r.biases:,} | {r.output_size} |")
    weights = sum(r.weights for r in rows)
    biases = sum(r.biases for r in rows)
    lines.append(f"\nTotal: {weights + biases:,} parameters ({weights:,} weights + {biases:,} biases)")
    return "\n".join(lines)
