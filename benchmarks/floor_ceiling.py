"""The conv-layer ceiling of ``benchmarks/floor.py``: each convolution of the network timed alone
at its own input shape, in one precision, and summed over the layers (``conv_ceiling``), with the
per-layer table that shows it (``format_ceilings``)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

from _common import table  # first: it puts src/ on the path when needed

import torch
import torchvision

from scenesweep.compute import precision  # the conv shapes, as precision=auto times them

from floor_device import resolve_device, sync

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATISTICS = ("min", "median")


def _statistic(seconds: Sequence[float], statistic: str) -> float:
    if not seconds:
        return float("nan")
    return min(seconds) if statistic == "min" else statistics.median(seconds)


@dataclasses.dataclass
class LayerTiming:
    """One convolution timed alone: its shape (``scenesweep.compute.precision.ConvShape``: name,
    input (B, C_in, H, W), channels, kernel, padding, stride, GFLOP per call) and each timed call's
    seconds, warm-up calls left out."""

    shape: precision.ConvShape
    seconds: list[float] = dataclasses.field(default_factory=list)

    def __getattr__(self, name: str):
        shape = self.__dict__.get("shape")
        if shape is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(shape, name)  # name, in_shape, out_channels, kernel, padding, stride, gflop

    def time_s(self, statistic: str = "median") -> float:
        return _statistic(self.seconds, statistic)

    def gflops(self, statistic: str = "median") -> float:
        return self.gflop / self.time_s(statistic)


@dataclasses.dataclass
class ConvCeiling:
    """The summed per-layer ceiling of one network, shape and precision.

    Attributes:
        arch, image_size, batch_size, precision, device: what was measured.
        layers: one ``LayerTiming`` per convolution, in network order.
        statistic: "min" (best-of) or "median" of each layer's repeats, then summed.
    """

    arch: str
    image_size: int
    batch_size: int
    precision: str
    device: str
    layers: list[LayerTiming]
    statistic: str = "min"

    @property
    def seconds_per_batch(self) -> float:
        return sum(layer.time_s(self.statistic) for layer in self.layers)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds_per_batch / self.batch_size

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.seconds_per_batch

    @property
    def gflop_per_batch(self) -> float:
        return sum(layer.gflop for layer in self.layers)

    @property
    def gflops(self) -> float:
        return self.gflop_per_batch / self.seconds_per_batch

    @property
    def repeats(self) -> int:
        return min((len(layer.seconds) for layer in self.layers), default=0)

    def combined(self, other: "ConvCeiling") -> "ConvCeiling":
        """This ceiling with ``other``'s repeats pooled in (same network, shape and precision).

        For a ceiling measured before and after the thing it is compared with: the median of the
        pooled repeats shares the machine's load of both periods.
        """
        if (self.arch, self.image_size, self.batch_size, self.precision, self.device) != \
                (other.arch, other.image_size, other.batch_size, other.precision, other.device):
            raise ValueError("combined(): the two ceilings were measured on different settings")
        layers = [dataclasses.replace(a, seconds=a.seconds + b.seconds) for a, b in zip(self.layers, other.layers)]
        return dataclasses.replace(self, layers=layers)

    def as_dict(self) -> dict:
        return {"arch": self.arch, "image_size": self.image_size, "batch_size": self.batch_size,
                "precision": self.precision, "device": self.device, "statistic": self.statistic,
                "repeats": self.repeats, "seconds_per_batch": self.seconds_per_batch,
                "images_per_s": self.images_per_s, "gflop_per_batch": self.gflop_per_batch,
                "gflops": self.gflops,
                "layers": [{"name": l.name, "in_shape": list(l.in_shape), "out_channels": l.out_channels,
                            "gflop": l.gflop, "median_s": l.time_s("median"), "min_s": l.time_s("min"),
                            "seconds": l.seconds} for l in self.layers]}


def conv_layers(arch: str = "vgg16", image_size: int = 224, batch_size: int = 8) -> list[LayerTiming]:
    """Every Conv2d of ``torchvision.models.<arch>().features`` with the input shape it sees.

    Shapes come from forward hooks on the meta device (``scenesweep.compute.precision.conv_shapes``,
    what ``precision=auto`` times), so they are right at any input size and for any VGG depth.
    Pooling type does not matter here: every pooling the study uses halves the map the same way.
    At 224 px, batch 8, VGG16's 13 layers see (8, 3, 224, 224), (8, 64, 224, 224), (8, 64, 112,
    112), ..., (8, 512, 14, 14).
    """
    with torch.device("meta"):
        network = getattr(torchvision.models, arch)(weights=None).features
    return [LayerTiming(shape) for shape in precision.conv_shapes(network, image_size, batch_size)]


def conv_ceiling(arch: str = "vgg16", image_size: int = 224, batch_size: int = 8, precision: str = "bf16",
                 device: str | torch.device = "auto", repeats: int = 5, warmup: int = 2,
                 statistic: str = "min", seed: int = 0, min_time_s: float = 0.05,
                 max_repeats: int = 100) -> ConvCeiling:
    """Time each convolution alone, at its own input shape, and sum: the extraction ceiling.

    Each layer is a fresh ``nn.Conv2d`` (PyTorch's default random init) with the layer's
    channels, kernel, padding and stride, moved to ``precision`` and channels_last (weights and
    input), called under ``torch.inference_mode`` on a random input of its shape. Rounds go over
    all layers in turn (``warmup`` untimed rounds first: oneDNN / cuDNN pick and cache their
    kernels on the first calls of a shape), then at least ``repeats`` timed ones, and more until
    every layer has run ``min_time_s`` in all (at most ``max_repeats``): small layers (64 px: a
    millisecond each) get enough calls for a best-of to find one that no other process slowed.

    Args:
        arch: torchvision VGG name.
        image_size, batch_size: the input (B, 3, S, S) of the network.
        precision: "bf16" or "fp32".
        device: "auto", "cpu", "cuda" or a torch.device.
        repeats, warmup: timed (at the least) and untimed calls per layer.
        min_time_s, max_repeats: more timed rounds until each layer's calls add up to
            ``min_time_s``, up to ``max_repeats`` rounds.
        statistic: "min" (best-of, default) or "median" of each layer's repeats.
        seed: of the random weights and inputs (timings do not depend on values).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: expected one of {', '.join(STATISTICS)}")
    device = resolve_device(device)
    dtype = PRECISIONS[precision]
    layers = conv_layers(arch, image_size, batch_size)
    torch.manual_seed(seed)
    modules, inputs = [], []
    for layer in layers:
        conv = layer.shape.module()
        modules.append(conv.to(device=device, dtype=dtype, memory_format=torch.channels_last))
        inputs.append(torch.randn(layer.in_shape).to(device=device, dtype=dtype,
                                                     memory_format=torch.channels_last))
    def enough(round_index: int) -> bool:
        timed = round_index - warmup
        if timed < repeats:
            return False
        return timed >= max_repeats or all(sum(layer.seconds) >= min_time_s for layer in layers)

    with torch.inference_mode():
        round_index = 0
        while not enough(round_index):
            for layer, conv, x in zip(layers, modules, inputs):
                sync(device)
                began = time.perf_counter()
                conv(x)  # (B, C_out, H_out, W_out)
                sync(device)
                if round_index >= warmup:
                    layer.seconds.append(time.perf_counter() - began)
            round_index += 1
    return ConvCeiling(arch, image_size, batch_size, precision, str(device), layers, statistic)


def format_ceilings(ceilings: Sequence[ConvCeiling]) -> str:
    """A per-layer table: one row per convolution, ms per batch and GFLOP/s per precision; the sum."""
    first = ceilings[0]
    header = ["layer", "input (B, C, H, W)", "GFLOP"]
    for c in ceilings:
        header += [f"{c.precision} ms", f"{c.precision} GFLOP/s"]
    rows = []
    for i, layer in enumerate(first.layers):
        row = [layer.name, "x".join(map(str, layer.in_shape)), f"{layer.gflop:.1f}"]
        for c in ceilings:
            row += [f"{c.layers[i].time_s(c.statistic) * 1e3:.1f}", f"{c.layers[i].gflops(c.statistic):.0f}"]
        rows.append(row)
    total = ["sum", f"{first.arch} {first.image_size} px, batch {first.batch_size}", f"{first.gflop_per_batch:.1f}"]
    for c in ceilings:
        total += [f"{c.seconds_per_batch * 1e3:.1f}", f"{c.gflops:.0f}"]
    rows.append(total)
    lines = [table(header, rows)]
    for c in ceilings:
        lines.append(f"   {c.precision} ceiling: {c.seconds_per_batch * 1e3:.1f} ms per batch of {c.batch_size} "
                     f"= {c.images_per_s:.1f} images/s ({'best' if c.statistic == 'min' else 'median'} of {c.repeats} "
                     "repeats per layer, summed)")
    return "\n".join(lines)

