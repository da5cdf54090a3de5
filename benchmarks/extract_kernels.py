"""Parts 1 and 2 of ``benchmarks/extract.py``: the kernels it times and how.

The ceiling (one conv layer, 512 -> 512 channels at 28x28, and a square matmul, in fp32 and bf16)
and VGG16 conv + fc6/fc7 to relu7 in four settings (fp32, fp32 channels_last, bf16 autocast,
whole model in bf16), the conv layer and the settings timed round-robin (``measure_rounds``).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import _common  # noqa: F401  (puts src/ on the path when needed)

import numpy as np
import torch
from torch import nn

from scenesweep.compute import backbone, features

WARMUP = features.WARMUP_BATCHES  # leading batches / iterations left out of every timing


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock time covers the kernels (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device, repeats: int,
                 warmup: int = WARMUP) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    Warm-up calls let oneDNN / cuDNN pick and cache their kernels and the allocator settle.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            sync(device)
            seconds.append(time.perf_counter() - began)
    return seconds

# --------------------------------------------------------------------------------------------
# 1. The ceiling: one conv layer and one matmul
# --------------------------------------------------------------------------------------------

@dataclass
class Ceiling:
    """Throughput of one kernel in one precision."""

    name: str
    precision: str
    gflop: float  # per call
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gflops(self) -> float:
        return self.gflop / self.median_s


@dataclass
class ConvCeiling(Ceiling):
    """The conv-layer ceiling of one precision, timed inside the VGG rounds (see measure_rounds).

    The layer is 512 -> 512 channels, 3x3, padding 1, on (8, 512, 28, 28) channels_last: the
    shape of VGG16's conv4_2/conv4_3 at 224, so it is about the best the network's own layers
    can hope for on this machine and library build.
    """

    module: nn.Module | None = None
    input: torch.Tensor | None = None

    def call(self) -> torch.Tensor:
        return self.module(self.input)  # (8, 512, 28, 28)


def conv_ceilings(device: torch.device) -> list[ConvCeiling]:
    """The fp32 and bf16 conv layers, same weights and input, both channels_last."""
    torch.manual_seed(0)
    layer = nn.Conv2d(512, 512, kernel_size=3, padding=1).to(device).eval()
    x = torch.randn(8, 512, 28, 28, device=device)  # (N, C, H, W)
    gflop = 2.0 * 8 * 512 * 28 * 28 * 512 * 3 * 3 / 1e9  # 2 * N*C_out*H*W * C_in*kh*kw = 29.6
    return [ConvCeiling("conv3x3 512->512 28x28 b8", precision, gflop, [],
                        copy.deepcopy(layer).to(dtype=dtype, memory_format=torch.channels_last),
                        x.to(dtype=dtype, memory_format=torch.channels_last))
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]


def matmul_ceilings(device: torch.device, size: int, repeats: int) -> list[Ceiling]:
    """GFLOP/s of an (n, n) @ (n, n) matmul in fp32 and bf16 (for reference; not in the ratios)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    results = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a_, b_ = a.to(dtype), b.to(dtype)
        seconds = time_repeats(lambda: torch.mm(a_, b_), device, repeats)
        results.append(Ceiling(f"matmul {size}x{size}", precision, 2.0 * size ** 3 / 1e9, seconds))
    return results


# --------------------------------------------------------------------------------------------
# 2. VGG16 extraction in four settings
# --------------------------------------------------------------------------------------------

@dataclass
class Setting:
    """One way of running conv + from_conv to relu7.

    Attributes:
        name: shown in the table.
        precision: "fp32" or "bf16": which ceiling it is compared with.
        model: the network, already in its dtype and memory format.
        dtype, memory_format: what each input batch is converted to (inside the timed region,
            as ``extract_conv`` does per batch).
        context: a fresh context per batch (autocast, or nothing); entered per batch because
            that is how a caller uses it, and autocast's weight-cast cache lives only that long.
    """

    name: str
    precision: str
    model: nn.Module
    dtype: torch.dtype
    memory_format: torch.memory_format
    context: Callable[[], ContextManager]
    seconds: list[float] = field(default_factory=list)
    first_output: torch.Tensor | None = None

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) fp32 NCHW -> (B, 4096) fp32 relu7 features."""
        x = batch.to(dtype=self.dtype, memory_format=self.memory_format)
        with self.context():
            conv_out = backbone.trunk_forward(self.model, x)  # (B, 512, S/32, S/32)
            return backbone.from_trunk(self.model, conv_out, "relu7")  # (B, 4096)


def make_settings(model: nn.Module, device: torch.device) -> list[Setting]:
    """The four settings; the two channels_last fp32 ones share one model (autocast casts on the fly)."""
    cl = torch.channels_last
    fp32 = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    fp32_cl = copy.deepcopy(model).to(device=device, dtype=torch.float32, memory_format=cl)
    # Same conversion as features.extract_conv for precision "bf16".
    bf16_cl = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16, memory_format=cl)
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    return [
        Setting("fp32", "fp32", fp32, torch.float32, torch.contiguous_format, contextlib.nullcontext),
        Setting("fp32 channels_last", "fp32", fp32_cl, torch.float32, cl, contextlib.nullcontext),
        Setting("bf16 autocast + channels_last", "bf16", fp32_cl, torch.float32, cl, autocast),
        Setting("bf16 whole model + channels_last", "bf16", bf16_cl, torch.bfloat16, cl, contextlib.nullcontext),
    ]


def measure_rounds(ceilings: list[ConvCeiling], settings: list[Setting], device: torch.device,
                   image_size: int, batch_size: int, batches: int, conv_calls: int) -> None:
    """Time ``WARMUP + batches`` rounds; fills every ``seconds`` list, warm-up rounds left out.

    Each round makes ``conv_calls`` calls of each conv ceiling layer, then one batch of each
    VGG setting, so slow periods caused by other processes are shared by all of them instead of
    biasing whichever happened to run at the time.
    """
    generator = torch.Generator().manual_seed(0)
    # Synthetic batches, already normalised-looking: (B, 3, S, S) fp32 NCHW on the device.
    inputs = [torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
              for _ in range(2)]
    with torch.inference_mode():
        for round_index in range(WARMUP + batches):
            for ceiling in ceilings:
                for _ in range(conv_calls):
                    sync(device)
                    began = time.perf_counter()
                    ceiling.call()
                    sync(device)
                    if round_index >= WARMUP:
                        ceiling.seconds.append(time.perf_counter() - began)
            batch = inputs[round_index % len(inputs)]
            for setting in settings:
                sync(device)
                began = time.perf_counter()
                out = setting.run(batch)
                sync(device)
                setting.seconds.append(time.perf_counter() - began)
                if round_index == 0:
                    setting.first_output = out.cpu()  # (B, 4096) to compare with fp32


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Cosine similarity of two arrays taken as flat vectors, in float64."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
