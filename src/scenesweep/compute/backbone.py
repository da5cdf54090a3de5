"""The VGG backbone: construction, pooling swap, wider fc layers, feature layers, layer table.

The network is torchvision's VGG (vgg16 by default) split into two stages:
  * ``conv(x)``: the convolutional part, (N, 3, S, S) -> (N, 512, S/32, S/32). Expensive;
    its output is what the feature cache stores.
  * ``from_conv(c, layer)``: VGG's adaptive average pool to 7x7, flatten (pool5, 25088), then
    fc6 / relu6 / fc7 / relu7. Cheap beside the convolutions, recomputed from the cache.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from torch import nn
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..core.config import FC_WIDTH_PRETRAINED, LAYERS, POOLINGS
from ..core.errors import ConfigError, UserError, first_line
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)

# Name -> factory of the module that replaces each 2x2/stride-2 max-pool.
POOLING_LAYERS = {
    "max": lambda: nn.MaxPool2d(kernel_size=2, stride=2),
    "avg": lambda: nn.AvgPool2d(kernel_size=2, stride=2),
    # LPPool2d(p=1) sums each 2x2 window: the study's "sum" pooling.
    "lp1": lambda: nn.LPPool2d(norm_type=1, kernel_size=2, stride=2),
    "lp2": lambda: nn.LPPool2d(norm_type=2, kernel_size=2, stride=2),
}
assert tuple(POOLING_LAYERS) == POOLINGS

# Width of each feature layer for a given fc width.
def layer_width(layer: str, fc_width: int = FC_WIDTH_PRETRAINED) -> int:
    if layer not in LAYERS:
        raise ConfigError(f"layer={layer!r}: expected one of {', '.join(LAYERS)}")
    return 512 * 7 * 7 if layer == "pool5" else fc_width


class WeightsError(UserError):
    """Backbone weights cannot be found or do not fit; the message says how to provide them."""


def _imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def preprocessing(arch: str = "vgg16", image_size: int = 224) -> ImageClassification:
    """The torchvision weights' own transform (resize, centre crop, ImageNet normalisation).

    At the weights' native 224 it is exactly ``VGG16_Weights.IMAGENET1K_V1.transforms()``
    (resize 256, crop 224); other sizes keep the same 256/224 resize-to-crop ratio.
    """
    weights = _imagenet_weights(arch)
    native = weights.transforms()
    resize = int(round(image_size * native.resize_size[0] / native.crop_size[0]))
    return weights.transforms(crop_size=image_size, resize_size=resize,
                              interpolation=InterpolationMode.BILINEAR)


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


def check_weights(arch: str, weights: str) -> None:
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
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    _load_state_dict(model, weights, arch, assign=True)


def build_backbone(arch: str = "vgg16", weights: str = "random", pooling: str = "max",
                   fc_width: int = FC_WIDTH_PRETRAINED, seed: int = 0) -> nn.Module:
    """torchvision VGG with its max-pools swapped and fc6/fc7 widened, in eval mode.

    Args:
        arch: VGG depth, e.g. "vgg16".
        weights: "imagenet", "random" (torchvision's initialisation, seeded) or a state_dict path.
        pooling: name from ``POOLINGS``; every max-pool is replaced by it.
        fc_width: width of fc6 and fc7. Other than 4096, fc6/fc7/fc8 are new layers with
            PyTorch's default initialisation, seeded: untrained, as in the study (Q12.1).
        seed: seed of the random initialisation.
    """
    if pooling not in POOLING_LAYERS:
        raise ConfigError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    if weights != "random":
        _load_state_dict(model, weights, arch)
    for index, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            model.features[index] = POOLING_LAYERS[pooling]()
    if fc_width != FC_WIDTH_PRETRAINED:
        generator_seed = seed + 1_000_003  # independent of the conv init, same for any weights
        torch.manual_seed(generator_seed)
        # classifier: [fc6, relu6, dropout, fc7, relu7, dropout, fc8]
        model.classifier[0] = nn.Linear(512 * 7 * 7, fc_width)
        model.classifier[3] = nn.Linear(fc_width, fc_width)
        model.classifier[6] = nn.Linear(fc_width, 1000)
    return model.eval()


def architecture(arch: str = "vgg16", pooling: str = "max", fc_width: int = FC_WIDTH_PRETRAINED) -> nn.Module:
    """The network's structure without weights (on the meta device): for tables and shapes."""
    with torch.device("meta"):
        return build_backbone(arch, "random", pooling, fc_width)


class PoolingBranches(nn.Module):
    """The conv part for several pooling types at once: (N, 3, S, S) -> one (N, 512, S/32, S/32)
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
            nn.Sequential(*[POOLING_LAYERS[pooling]() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d))
                            else m for m in features[first:]])
            for pooling in poolings)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shared = self.trunk(x)  # (N, 64, S, S) at VGG's first block
        return tuple(branch(shared) for branch in self.branches)


def conv(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Convolutional part: (N, 3, S, S) -> (N, 512, S/32, S/32)."""
    return model.features(images)


# Which classifier modules each feature layer needs: [fc6, relu6, dropout, fc7, relu7, dropout, fc8].
FC6, FC7 = 0, 3
LAYER_FC_MODULES = {"pool5": (), "fc6": (FC6,), "relu6": (FC6,), "fc7": (FC6, FC7), "relu7": (FC6, FC7)}
assert tuple(LAYER_FC_MODULES) == LAYERS


def layer_state_keys(state_keys, layer: str) -> list[str]:
    """The backbone parameters ``layer`` needs: every conv layer plus fc6 / fc7 as required."""
    fc_modules = LAYER_FC_MODULES[layer]
    return [key for key in state_keys if key.startswith("features.")
            or key.startswith("classifier.") and int(key.split(".")[1]) in fc_modules]


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def to_inference(model: nn.Module, device: torch.device, precision: str, layer: str | None = None) -> nn.Module:
    """The network set up for extraction (features, serving): the convolutional part in the
    precision's dtype and channels_last (whole-model bf16 beats autocast on CPU, which re-casts
    the weights every call; channels_last lets oneDNN pick its fastest convolutions), and the
    fc layers that ``layer`` needs (with None: fc6 and fc7) on the device in the same dtype, in
    eval mode. Only the fc layers are set up when the conv part already is."""
    dtype = compute_dtype(precision)
    model.features.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    model.avgpool.to(device)
    for index in (LAYER_FC_MODULES[layer] if layer is not None else (FC6, FC7)):
        model.classifier[index].to(device=device, dtype=dtype)
    return model.eval()


def from_conv(model: nn.Module, conv_out: torch.Tensor, layer: str) -> torch.Tensor:
    """Feature layer from the conv output, in eval mode (dropout off), as float32.

    (N, 512, h, w) -> pool5 (N, 25088) -> fc6/relu6/fc7/relu7 (N, fc_width); fc6 and fc7 run
    in their weights' dtype (the extraction precision).
    """
    if layer not in LAYERS:
        raise ConfigError(f"layer={layer!r}: expected one of {', '.join(LAYERS)}")
    x = torch.flatten(model.avgpool(conv_out), 1)  # adaptive pool to 7x7: (N, 512*7*7)
    if layer == "pool5":
        return x.float()
    fc6, fc7 = model.classifier[FC6], model.classifier[FC7]
    x = fc6(x.to(fc6.weight.dtype))
    if layer != "fc6":
        x = torch.relu(x)
    if layer in ("fc7", "relu7"):
        x = fc7(x)
    if layer == "relu7":
        x = torch.relu(x)
    return x.float()


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
    """Q1: every conv, pool and fc layer with channels, weight and bias counts, output size."""
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
