"""Backbones by name: each family of torchvision classifiers declared once, as data.

A family says which architectures it holds (torchvision's builder names, which also name their
weights enums: ``get_model_weights("resnet50").IMAGENET1K_V1``), how wide its trunk's output is
for each, its named feature taps and their widths, the pooling types it can swap in and whether
the pooling sits inside the trunk (VGG: every max-pool; then each pooling needs its own
convolutions) or after it (one global pooling: the trunk runs once for every pooling type).

The trunk is the expensive part, what the feature cache stores:
  * vgg: ``features``, (N, 3, S, S) -> (N, 512, S/32, S/32)
  * resnet: conv1 .. layer4, -> (N, 512 or 2048, S/32, S/32)
  * convnext, efficientnet: ``features``, -> (N, 768 or 1280, S/32, S/32)
  * vit: patch embedding + class token + encoder, -> (N, 768): the class token after the last
    LayerNorm (the trunk holds nearly all of ViT's compute, so it ends at the token)

What runs the network (torch) is in ``compute/backbone.py``, keyed by these family names; this
module is plain data, so that parameters are checked without loading torch. Nothing outside the
two modules branches on a family's or an architecture's name.

This module imports neither torch, MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .errors import ConfigError

# Every pooling type a backbone may swap in, with what it computes. Inside VGG's trunk they
# replace each 2x2/stride-2 max-pool; after a trunk they pool its whole (N, C, h, w) map to (N, C).
POOLING_MEANINGS = {
    "max": "maximum of each window",
    "avg": "mean of each window",
    "lp1": "sum of each window (LPPool p=1, the study's 'sum' pooling)",
    "lp2": "L2 norm of each window (LPPool p=2)",
    "gem": "generalised mean, p=3 fixed (Radenovic et al.): between avg (p=1) and max (p -> inf)",
    "token": "ViT's class token (the network's own summary of its patches)",
}
POOLINGS = tuple(POOLING_MEANINGS)


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """One family of torchvision classifiers, as the rest of the package sees it.

    Attributes:
        name: the family's name (``compute/backbone.py`` implements it under this name).
        channels: architecture -> channels of the trunk's output (ViT: the token width).
        taps: feature layers in network order; ``tap_widths`` gives each one's width from
            (channels, fc_width).
        poolings: the pooling types it supports, its own first.
        pools_in_trunk: the pooling changes the trunk's output (VGG's max-pools): one cache
            entry per pooling type; else the trunk's output is shared by every pooling type.
        fc_taps: taps computed by fully connected layers whose width ``fc_width`` sets (VGG's
            fc6/fc7); other families have none and refuse another width.
        default_taps: head -> the tap it reads unless told (None: any head); the SVM reads the
            penultimate features, as Kornblith et al. do.
        patch: the input side must be a multiple of this (ViT's 16 px patches).
    """

    name: str
    channels: dict[str, int]
    taps: tuple[str, ...]
    tap_widths: dict[str, Callable[[int, int], int]]
    poolings: tuple[str, ...]
    pools_in_trunk: bool
    default_taps: dict[str | None, str]
    fc_taps: tuple[str, ...] = ()
    patch: int = 1

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(self.channels)

    @property
    def own_pooling(self) -> str:
        return self.poolings[0]

    def tap_width(self, arch: str, tap: str, fc_width: int) -> int:
        return self.tap_widths[tap](self.channels[arch], fc_width)

    def default_tap(self, head: str | None) -> str:
        return self.default_taps.get(head, self.default_taps[None])


_GLOBAL_POOLINGS = ("avg", "max", "lp2", "gem")  # for a trunk followed by one global pooling
# ResNet's layer4 tap: its map average-pooled to this grid (both its width here and the pooling in
# compute/family_code.py read it: one number, not two that must agree).
RESNET_LAYER4_GRID = 2

FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        "vgg", {"vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512},
        taps=("pool5", "fc6", "relu6", "fc7", "relu7"),
        # pool5: VGG's adaptive pool to 7x7 then flatten, 512 * 7 * 7 = 25088 at any input size.
        tap_widths={"pool5": lambda c, fc: c * 7 * 7, "fc6": lambda c, fc: fc, "relu6": lambda c, fc: fc,
                    "fc7": lambda c, fc: fc, "relu7": lambda c, fc: fc},
        poolings=("max", "avg", "lp1", "lp2"), pools_in_trunk=True,
        # The study: the SVM on relu7 (Q8/Q10), the new head on pool5 (Q11/Q12.2).
        default_taps={None: "relu7", "svm": "relu7", "mlp": "pool5"},
        fc_taps=("fc6", "relu6", "fc7", "relu7")),
    BackboneFamily(
        "resnet", {"resnet18": 512, "resnet50": 2048},
        taps=("layer4", "pool"),
        # layer4: its map average-pooled to 2x2 and flattened (the coarse layout kept, as pool5
        # keeps VGG's 7x7); pool: the global pooling, the 512/2048-d penultimate features.
        tap_widths={"layer4": lambda c, fc: c * RESNET_LAYER4_GRID ** 2, "pool": lambda c, fc: c},
        poolings=_GLOBAL_POOLINGS, pools_in_trunk=False, default_taps={None: "pool"}),
    BackboneFamily(
        "convnext", {"convnext_tiny": 768},
        # pool: the global pooling then ConvNeXt's own LayerNorm, what its classifier reads.
        taps=("pool",), tap_widths={"pool": lambda c, fc: c},
        poolings=_GLOBAL_POOLINGS, pools_in_trunk=False, default_taps={None: "pool"}),
    BackboneFamily(
        "efficientnet", {"efficientnet_b0": 1280},
        taps=("pool",), tap_widths={"pool": lambda c, fc: c},
        poolings=_GLOBAL_POOLINGS, pools_in_trunk=False, default_taps={None: "pool"}),
    BackboneFamily(
        "vit", {"vit_b_16": 768},
        taps=("pool",), tap_widths={"pool": lambda c, fc: c},
        poolings=("token",), pools_in_trunk=True, default_taps={None: "pool"}, patch=16),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
FAMILY_BY_ARCH = {arch: family for family in FAMILIES for arch in family.archs}
ARCHS = tuple(FAMILY_BY_ARCH)
# Every tap of every family, in the order they are declared (VGG's first, as the study has them).
LAYERS = tuple(dict.fromkeys(tap for family in FAMILIES for tap in family.taps))


def family_of(arch: str) -> BackboneFamily:
    """The family of a registered architecture; anything else: one error listing them."""
    try:
        return FAMILY_BY_ARCH[arch]
    except KeyError:
        raise ConfigError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}") from None


def check_backbone(arch: str, layer: str, pooling: str, fc_width: int, fc_width_pretrained: int,
                   image_size: int) -> None:
    """Refuse a combination the backbone does not have (a tap, a pooling, a width, a size),
    naming the value and what this architecture accepts."""
    family = family_of(arch)
    if layer not in family.taps:
        raise ConfigError(f"layer={layer!r}: {arch} has the feature layers {', '.join(family.taps)}")
    if pooling not in family.poolings:
        raise ConfigError(f"pooling={pooling!r}: {arch} takes the poolings {', '.join(family.poolings)}")
    if fc_width != fc_width_pretrained and not family.fc_taps:
        raise ConfigError(f"fc_width={fc_width}: {arch} has no fc6/fc7 to widen (VGG only); "
                          f"leave it at {fc_width_pretrained}")
    if image_size % family.patch:
        raise ConfigError(f"image_size={image_size}: {arch} reads {family.patch} px patches; "
                          f"expected a multiple of {family.patch}")
