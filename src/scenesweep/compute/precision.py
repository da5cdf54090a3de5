"""``precision=auto`` chosen by measuring this machine, once per machine and shape.

Whether bf16 beats fp32 is a property of the hardware, not of a flag: oneDNN reports bf16 support
on every AVX-512 BF16 CPU, yet measured on two CPUs of one cloud kind (2 cores, VGG16 conv layers
at 224 px, batch 8) bf16 ran 6.5x fp32 where AMX is exposed and 0.69x where it is not; a head's
training step (25088-1024-1024-15, Adam) is slower in bf16 autocast on both. So on first use the
candidates are timed on the run's own shapes and the faster one is kept:

* extraction: one convolution per distinct layer shape of the network (conv1_1, conv1_2, conv2_1,
  ...; VGG16's 13 layers have 9 shapes), at the run's image size and batch, in fp32 and bf16,
  weights and input channels_last, interleaved, best of a few calls, weighted by how many layers
  share the shape: seconds per batch, images/s. About 1 to 4 s at 224 px on 2 cores.
* the mlp head: its training step (forward, loss, backward, fused Adam) at the run's widths and
  batch, fp32 against bf16 autocast: steps/s.

bf16 is chosen only when it is at least ``BF16_MARGIN`` faster: its features differ from fp32's by
about 1e-2 relative, which buys nothing when the speed is a tie. The figures are kept in the cache
folder (``<cache>/precision/<key>.json``, written atomically), keyed by what decides them: CPU
vendor, family, model, stepping and speed flags, torch's CPU capability, core and thread counts,
torch version, device (and GPU name), network or head shape, batch and image size. A second run
reuses them (and says so). An explicit ``precision=fp32|bf16`` is obeyed without measuring.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core.errors import UserError
from ..core.machine import this_cpu
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from .atomic_files import atomic_write
from .hardware import cpu_capability
from .mlp_layers import build_mlp

PROBE_FORMAT = 1
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MARGIN = 1.10  # bf16 must be this many times faster than fp32 to be chosen
PROBE_WARMUP, PROBE_REPEATS = 1, 2  # untimed and timed calls per layer and precision
HEAD_WARMUP, HEAD_STEPS = 2, 5  # untimed and timed training steps per precision

# A measurement: precision -> speed (images/s for extraction, steps/s for a head).
Measure = Callable[[str], float]


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """The precision a stage runs in, and why.

    Attributes:
        precision: "fp32" or "bf16".
        reason: one line for people, e.g. "fp32: 7.9 vs bf16 5.4 img/s on this CPU (measured)".
        figures: the measured speed of each candidate (empty when given explicitly).
        source: "given" (precision=fp32|bf16), "measured" (now) or "cached" (measured before).
    """

    precision: str
    reason: str
    figures: dict[str, float] = dataclasses.field(default_factory=dict)
    source: str = "given"


# --------------------------------------------------------------------------------------------
# What decides the choice
# --------------------------------------------------------------------------------------------

def machine_identity(device: torch.device) -> dict[str, str]:
    """What makes a measurement valid on another run: the hardware and torch, not the time of day."""
    cpu = this_cpu()
    identity = {"cpu_vendor": cpu.vendor, "cpu_family": cpu.family, "cpu_model": cpu.model,
                "cpu_stepping": cpu.stepping, "cpu_brand": cpu.brand, "cpu_flags": cpu.flags_text(),
                "cpu_capability": cpu_capability(), "cores": str(os.cpu_count()),
                "threads": str(torch.get_num_threads()), "torch": torch.__version__, "device": str(device.type)}
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
    return identity


def where(device: torch.device) -> str:
    return "this GPU" if device.type == "cuda" else "this CPU"


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution of a network at the input it sees.

    Attributes:
        name: 'conv3_2' (block 3, second convolution).
        in_shape: (B, C_in, H, W); out_channels, kernel, padding, stride, groups: the layer.
        gflop: per call, 2 * B * C_out * H_out * W_out * C_in/groups * kh * kw / 1e9.
    """

    name: str
    in_shape: tuple[int, int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    padding: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    gflop: float

    @property
    def signature(self) -> tuple:
        return self.in_shape, self.out_channels, self.kernel, self.padding, self.stride, self.groups

    def module(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_shape[1], self.out_channels, self.kernel, stride=self.stride, padding=self.padding,
                         groups=self.groups).eval()


def conv_shapes(network: nn.Module, image_size: int, batch_size: int) -> list[ConvShape]:
    """Every Conv2d of ``network`` (built on the meta device) with the input shape it sees.

    Forward hooks on the meta device: no memory, no compute, right at any input size. Layers are
    named convB_I, B counting the blocks between max-pools (or any other pooling).
    """
    found: list[ConvShape] = []
    block, index_in_block = 1, 0
    handles = []
    for module in network.modules():
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)):
            block, index_in_block = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            index_in_block += 1

            def hook(conv: nn.Conv2d, inputs, output, name=f"conv{block}_{index_in_block}") -> None:
                b, c_in, h, w = inputs[0].shape  # (B, C_in, H, W)
                _, c_out, h_out, w_out = output.shape  # (B, C_out, H_out, W_out)
                kh, kw = conv.kernel_size
                gflop = 2.0 * b * c_out * h_out * w_out * (c_in // conv.groups) * kh * kw / 1e9
                found.append(ConvShape(name, (b, c_in, h, w), c_out, tuple(conv.kernel_size), tuple(conv.padding),
                                       tuple(conv.stride), conv.groups, gflop))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            network(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_convs(shapes: list[ConvShape], device: torch.device, precisions=tuple(PRECISION_DTYPES),
                  warmup: int = PROBE_WARMUP, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Images/s of the network's convolutions in each precision: one layer per distinct shape,
    best of ``repeats`` calls (after ``warmup``), weighted by the layers sharing the shape, summed.

    Precisions and layers take turns call by call, so a slow moment of the machine lands on all.
    """
    distinct: dict[tuple, tuple[ConvShape, int]] = {}
    for shape in shapes:
        first, count = distinct.get(shape.signature, (shape, 0))
        distinct[shape.signature] = (first, count + 1)
    torch.manual_seed(0)
    runs = []  # (precision, layer weight, module, input, best seconds)
    for precision in precisions:
        dtype = PRECISION_DTYPES[precision]
        for shape, count in distinct.values():
            conv = shape.module().to(device=device, dtype=dtype, memory_format=torch.channels_last)
            x = torch.randn(shape.in_shape).to(device=device, dtype=dtype, memory_format=torch.channels_last)
            runs.append([precision, count, conv, x, float("inf")])
    with torch.inference_mode():
        for call in range(warmup + repeats):
            for run in runs:
                _sync(device)
                began = time.perf_counter()
                run[2](run[3])
                _sync(device)
                if call >= warmup:
                    run[4] = min(run[4], time.perf_counter() - began)
    batch = shapes[0].in_shape[0] if shapes else 1
    seconds = {p: sum(count * best for q, count, _, _, best in runs if q == p) for p in precisions}
    return {p: batch / s if s > 0 else float("inf") for p, s in seconds.items()}


def measure_head_steps(widths: tuple[int, ...], batch_size: int, device: torch.device,
                       precisions=tuple(PRECISION_DTYPES), warmup: int = HEAD_WARMUP, steps: int = HEAD_STEPS,
                       samples: int = 256) -> dict[str, float]:
    """Training steps per second of an MLP of ``widths`` (input first, classes last) at
    ``batch_size``, fused Adam and cross-entropy, in fp32 and under bf16 autocast; best step."""
    torch.manual_seed(0)
    X = torch.randn(samples, widths[0], device=device)  # (S, D)
    y = torch.randint(0, widths[-1], (samples,), device=device)
    speed = {}
    for precision in precisions:
        model = build_mlp(widths[0], tuple(widths[1:-1]), 0.5, widths[-1]).to(device).train()  # the head that runs
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
        best = float("inf")
        for step in range(warmup + steps):
            index = torch.randint(0, samples, (batch_size,), device=device)
            _sync(device)
            began = time.perf_counter()
            with autocast(device, precision):
                loss = nn.functional.cross_entropy(model(X[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            if step >= warmup:
                best = min(best, time.perf_counter() - began)
        speed[precision] = 1.0 / best if best > 0 else float("inf")
    return speed


def autocast(device: torch.device, precision: str):
    """bf16 autocast for a head's forward pass (weights and optimiser stay fp32), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------------------------
# The choice, measured once and kept
# --------------------------------------------------------------------------------------------

_MEMO: dict[str, dict] = {}  # key -> the stored record, per process


def _speed(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def decide(figures: dict[str, float], unit: str, device: torch.device, source: str) -> PrecisionChoice:
    """bf16 when it is at least ``BF16_MARGIN`` times fp32's speed, else fp32, with the reason."""
    fp32, bf16 = figures.get("fp32", 0.0), figures.get("bf16", 0.0)
    chosen = "bf16" if bf16 >= BF16_MARGIN * fp32 else "fp32"
    other = "fp32" if chosen == "bf16" else "bf16"
    note = "measured" if source == "measured" else "measured before, cached"
    reason = f"{chosen}: {_speed(figures[chosen])} vs {other} {_speed(figures[other])} {unit} on {where(device)} ({note})"
    if chosen == "fp32" and fp32 <= bf16:
        reason += f"; bf16 is chosen from {BF16_MARGIN:.2f}x"
    return PrecisionChoice(chosen, reason, dict(figures), source)


def choose(requested: str, what: dict, unit: str, device: torch.device, cache_dir: Path | None,
           measure: Callable[[], dict[str, float]]) -> PrecisionChoice:
    """``requested`` when fp32 or bf16; for "auto", the faster one by ``measure()``, whose figures
    are kept under ``cache_dir`` keyed by ``what`` and the machine.

    Args:
        requested: the run's ``precision`` parameter.
        what: the shapes measured (network, image size, batch; or head widths, batch).
        unit: of the figures ("img/s", "steps/s").
        measure: times the candidates: {"fp32": speed, "bf16": speed}.
    """
    if requested in PRECISION_DTYPES:
        return PrecisionChoice(requested, f"{requested}: given (precision={requested})")
    key_parts = {"format": PROBE_FORMAT, "what": what, "machine": machine_identity(device)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "precision" / f"{key}.json" if cache_dir is not None else None
    record = _MEMO.get(key)
    if record is None and path is not None:
        try:
            stored = json.loads(path.read_text())
            if stored.get("key_parts") == key_parts and set(stored.get("figures", {})) == set(PRECISION_DTYPES):
                record = stored
        except (OSError, ValueError, AttributeError):
            record = None  # missing or damaged: measured again
    if record is not None:
        _MEMO[key] = record
        return decide(record["figures"], unit, device, "cached")
    figures = {p: float(v) for p, v in measure().items()}
    record = {"key_parts": key_parts, "figures": figures, "unit": unit, "measured_at": time.time()}
    _MEMO[key] = record
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda handle: handle.write(json.dumps(record, indent=1).encode()))
        except (OSError, UserError):
            pass  # a read-only or full cache only means measuring again next time
    return decide(figures, unit, device, "measured")


def choose_extraction(requested: str, network: Callable[[], nn.Module], arch: str, image_size: int,
                      batch_size: int, device: torch.device, cache_dir: Path | None) -> PrecisionChoice:
    """The precision the conv part runs in (``network()``: the conv part on the meta device,
    built only when a measurement is needed)."""
    what = {"stage": "extraction", "arch": arch, "image_size": image_size, "batch_size": batch_size}
    return choose(requested, what, "img/s", device, cache_dir,
                  lambda: measure_convs(conv_shapes(network(), image_size, batch_size), device))


def choose_head(requested: str, widths: tuple[int, ...], batch_size: int, device: torch.device,
                cache_dir: Path | None) -> PrecisionChoice:
    """The precision an mlp head trains in (``widths``: input, hidden..., classes)."""
    what = {"stage": "head", "widths": list(widths), "batch_size": batch_size}
    return choose(requested, what, "steps/s", device, cache_dir,
                  lambda: measure_head_steps(tuple(widths), batch_size, device))
