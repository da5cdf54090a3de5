"""Measurement helpers shared by the benchmarks: this machine's floor for extraction and head training.

Two floors, each measured on the machine at hand (never assumed: the CPU may be an Intel with AMX
or an AMD with AVX-512 bf16 or neither, and the library build matters as much):

1. ``conv_ceiling``: the ceiling that counts for feature extraction. Every convolution of the
   network (torchvision VGG16 by default, random weights) is timed alone, at its own input shape
   (batch 8 at 224 px by default), in a given precision, repeated, and the best (or the median)
   of each is summed over the layers: seconds per batch, images/s. Best-of by default: a ceiling
   is the least time a layer takes here, and another process on the machine only ever adds time
   (at small shapes, two OpenMP threads sharing a core with someone else can take 10x longer). ``precision="bf16"`` is
   what ``scenesweep.compute.features.extract_conv`` runs on CPUs with native bf16 and on CUDA (weights
   and inputs in bf16, channels_last); "fp32" is the same in float32. The sum leaves out what
   lies between the convolutions (ReLU, pooling) and everything around them (decoding, resizing,
   copies): an eager extractor can approach it; passing it takes faster convolutions than these
   (a compiled graph that fuses them with their ReLU, say).
2. ``head_step``: the bare PyTorch training step of a head: a ``torch.nn.Sequential`` MLP of
   given widths (Linear, ReLU, Dropout per hidden width, then Linear; the study's
   25088-1024-1024-15 with dropout 0.5 by default), Adam (``fused=True`` on CPU and CUDA),
   cross-entropy, on random features held in one tensor on the device. It runs under the
   process settings every scenesweep run has (``scenesweep.compute.numerics``: denormals flushed),
   so no run gains from a setting the floor lacks. Its floor
   (``floor_s``) is ``head_op_ceiling``, the head's own summed ceiling: each operation of a step
   timed alone at its best and summed, as the conv ceiling sums the layers (the forward GEMMs,
   the weight- and input-gradient GEMMs into buffers reused from call to call, the fused Adam
   update). Not the bare loop's best step: a step on CPU is mostly the page faults on fc6's
   weight gradient, allocated afresh every step (100 MB), whose cost depends on the memory the
   kernel has at hand (``benchmarks/head_floor.py``), and trials in a process that had run a long
   extraction stepped 17 % below a fresh bare loop's best (Q12.3 on an AMD EPYC Zen 3).

Both interleave their repeats (round-robin over the layers), so that a slow period caused by
another process is shared by all layers rather than landing on one. Used by
``benchmarks/extract.py`` and ``benchmarks/study.py``; it can also be run alone:

    .venv/bin/python benchmarks/floor.py [--image-size 224] [--batch-size 8] [--device auto]

What it times is torch and torchvision alone (no scenesweep code, MLflow or Optuna), so that a
benchmark's floor does not move when the package changes; it asks scenesweep only which device
and precision the extractor would pick on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import load_average, table  # noqa: E402,F401  (puts src/ on the path when needed)

from scenesweep.compute import features, hardware, numerics, precision  # noqa: E402  (device, as the extractor resolves it; the machine; the runs' process settings)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATISTICS = ("min", "median")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock time covers the kernels (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu (as scenesweep's own ``device=auto``)."""
    return name if isinstance(name, torch.device) else hardware.resolve_device(name)


def _statistic(seconds: Sequence[float], statistic: str) -> float:
    if not seconds:
        return float("nan")
    return min(seconds) if statistic == "min" else statistics.median(seconds)


# --------------------------------------------------------------------------------------------
# 1. The conv-layer ceiling
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# 2. The bare training step of a head
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HeadStep:
    """Step times of a bare PyTorch loop training one MLP head.

    Attributes:
        widths: layer widths, input first, classes last (e.g. (25088, 1024, 1024, 15)).
        dropout, batch_size, device, optimizer: the setting.
        seconds: each timed step (warm-up left out).
    """

    widths: tuple[int, ...]
    dropout: float
    batch_size: int
    device: str
    optimizer: str
    seconds: list[float]
    settings: dict = dataclasses.field(default_factory=lambda: process_settings())
    op_ceiling: dict[str, float] | None = None  # head_op_ceiling's parts, when measured

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def op_ceiling_s(self) -> float | None:
        return sum(self.op_ceiling.values()) if self.op_ceiling else None

    @property
    def floor_s(self) -> float:
        """The step time no run of this head can beat: the summed-op ceiling when measured (never
        above the bare loop's best), else the bare loop's best step."""
        return min(self.min_s, self.op_ceiling_s) if self.op_ceiling else self.min_s

    def as_dict(self) -> dict:
        return {"widths": list(self.widths), "dropout": self.dropout, "batch_size": self.batch_size,
                "device": self.device, "optimizer": self.optimizer, "median_s": self.median_s,
                "min_s": self.min_s, "op_ceiling_s": self.op_ceiling_s, "op_ceiling": self.op_ceiling,
                "floor_s": self.floor_s, "steps": len(self.seconds), **self.settings}


def head_op_ceiling(widths: Sequence[int], batch_size: int, device: torch.device, repeats: int = 100) -> dict[str, float]:
    """Seconds of each operation of one training step of the MLP ``widths`` at ``batch_size``,
    each timed alone at its best of ``repeats`` (round-robin), into buffers reused from call to
    call: per Linear, the forward GEMM (B, in) x (in, out), the weight gradient (out, B) x (B, in),
    the input gradient (B, out) x (out, in) but for the first layer (the features need none); then
    the fused Adam update of every parameter. ReLU, dropout and the loss on (B, hidden) are left
    out (microseconds), as are allocation and page faults: no loop of this head beats the sum."""
    torch.manual_seed(0)
    calls: dict[str, callable] = {}
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:]), 1):
        x = torch.randn(batch_size, width_in, device=device)  # (B, in)
        weight = torch.randn(width_out, width_in, device=device)  # (out, in)
        dy = torch.randn(batch_size, width_out, device=device)  # (B, out)
        y, dw, dx = (torch.empty(batch_size, width_out, device=device), torch.empty_like(weight),
                     torch.empty_like(x))
        calls[f"fc{index} forward"] = lambda x=x, w=weight, y=y: torch.mm(x, w.t(), out=y)
        calls[f"fc{index} weight gradient"] = lambda x=x, dy=dy, dw=dw: torch.mm(dy.t(), x, out=dw)
        if index > 1:
            calls[f"fc{index} input gradient"] = lambda w=weight, dy=dy, dx=dx: torch.mm(dy, w, out=dx)
    model = mlp(widths).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    optimizer.step()  # Adam's state allocated and touched before timing
    calls["Adam update (fused)"] = optimizer.step
    best = {name: float("inf") for name in calls}
    for _ in range(repeats + 1):  # the first round warms up
        for name, call in calls.items():
            sync(device)
            began = time.perf_counter()
            call()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - began)
    return best


def process_settings() -> dict:
    """What this process runs under that changes a step's time: scenesweep's numerics settings."""
    return {"flush_denormals": bool(numerics.FLUSHES_DENORMALS),
            "huge_page_allocations": bool(numerics.HUGE_PAGE_ALLOCATIONS)}


def mlp(widths: Sequence[int], dropout: float = 0.5) -> nn.Sequential:
    """(Linear, ReLU, Dropout) per hidden width, then Linear: the study's head for (D, h1, h2, C)."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def head_step(widths: Sequence[int] = (25088, 1024, 1024, 15), batch_size: int = 8, dropout: float = 0.5,
              device: str | torch.device = "auto", steps: int = 20, warmup: int = 3, rows: int = 1200,
              lr: float = 1e-3, seed: int = 0, features: torch.Tensor | None = None,
              op_ceiling: bool = True) -> HeadStep:
    """Step times of the bare loop: index a batch, forward, cross-entropy, backward, Adam.

    The features are one (rows, D) float32 tensor on the device (1200 rows: the study's training
    split; random normal values unless ``features`` gives them), a batch is a random index into
    it, as a loop over cached features does.

    Args:
        widths: (D, hidden..., n_classes).
        batch_size: rows per step.
        dropout: after each hidden layer.
        device: "auto", "cpu", "cuda" or a torch.device.
        steps, warmup: timed and untimed steps.
        rows: rows of the feature tensor the batches are drawn from.
        lr: Adam's learning rate (does not change the time).
        seed: of the weights, features and batches.
        features: (N, D) real features to step on instead of random ones (``rows`` is then N).
        op_ceiling: also measure ``head_op_ceiling`` (the floor) after the loop.
    """
    if len(widths) < 2:
        raise ValueError(f"widths={widths!r}: expected (input, [hidden...,] classes)")
    device = resolve_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = mlp(widths, dropout).to(device).train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    if features is None:
        features = torch.randn(rows, widths[0], generator=generator)  # (rows, D)
    features = features.to(device=device, dtype=torch.float32)
    rows = len(features)
    labels = torch.randint(0, widths[-1], (rows,), generator=generator).to(device)  # (rows,)
    seconds = []
    for step in range(warmup + steps):
        index = torch.randint(0, rows, (batch_size,), generator=generator).to(device)  # (B,)
        sync(device)
        began = time.perf_counter()
        logits = model(features[index])  # (B, n_classes)
        loss = loss_fn(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - began)
    del model, optimizer, features  # the ceiling's own buffers in their place
    ceiling = head_op_ceiling(widths, batch_size, device) if op_ceiling else None
    return HeadStep(tuple(int(w) for w in widths), float(dropout), int(batch_size), str(device),
                    f"Adam(fused={fused})", seconds, op_ceiling=ceiling)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="This machine's floor: the summed conv-layer ceiling and "
                                                 "the bare head step.")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (extraction and head)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--statistic", default="min", choices=STATISTICS,
                        help="of each conv layer's repeats: best-of or median")
    parser.add_argument("--head", default="25088,1024,1024,15", help="head widths, input first")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"machine: {hardware.describe(device)}")
    print(f"load average at start: {load_average()}")
    ceilings = [conv_ceiling(args.arch, args.image_size, args.batch_size, precision, device, args.repeats,
                             statistic=args.statistic) for precision in ("bf16", "fp32")]
    print(format_ceilings(ceilings))
    fastest = min(ceilings, key=lambda c: c.seconds_per_batch)
    slowest = max(ceilings, key=lambda c: c.seconds_per_batch)
    print(f"   faster here: {fastest.precision}, {slowest.seconds_per_batch / fastest.seconds_per_batch:.2f}x "
          f"{slowest.precision} (the floor of an extraction is the faster precision's ceiling)")
    widths = tuple(int(w) for w in args.head.split(","))
    step = head_step(widths, args.batch_size, device=device, steps=args.steps)
    print(f"bare head step {'-'.join(map(str, widths))}, batch {args.batch_size}, {step.optimizer}: "
          f"median {step.median_s * 1e3:.1f} ms, best {step.min_s * 1e3:.1f} ms over "
          f"{len(step.seconds)} steps; {', '.join(f'{k}={v}' for k, v in step.settings.items())}")
    print(f"summed-op ceiling of that step (the floor): {step.floor_s * 1e3:.1f} ms = "
          + " + ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in step.op_ceiling.items()))
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
