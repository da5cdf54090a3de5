"""How each backbone family of ``core/backbone_families.py`` runs in torch: its torchvision network split
into a trunk (what the feature cache stores) and taps, its pooling types, its Q1 layer rows.

``FAMILY_CODE`` holds one object per family, under the family's name; ``code_of(model)`` finds a
built network's. Only ``compute/backbone.py`` calls these.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from ..core.backbone_families import FAMILY_BY_NAME, RESNET_LAYER4_GRID, BackboneFamily
from ..core.errors import ConfigError
from .layer_tables import LayerRow, stage_table, vgg_layer_table

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
            return torch.flatten(nn.functional.adaptive_avg_pool2d(out, RESNET_LAYER4_GRID), 1)
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


def code_of(model: nn.Module) -> FamilyCode:
    for code in FAMILY_CODE.values():
        if isinstance(model, code.model_class):
            return code
    raise TypeError(f"{type(model).__name__} is not a registered backbone family")
