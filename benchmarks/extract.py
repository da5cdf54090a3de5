"""Benchmark VGG16 feature extraction against this machine's own ceiling, and check bf16 accuracy.

One run measures, on the same machine and in the same process:

1. The ceiling: GFLOP/s of one 3x3 conv layer (512 -> 512 channels, 28x28, batch 8,
   channels_last) and of a plain square matmul, each in fp32 and bf16.
2. VGG16 extraction (conv + from_conv to relu7, random weights, synthetic input) in four
   settings: fp32; fp32 channels_last; bf16 autocast + channels_last; whole model in bf16 +
   channels_last (what ``scenesweep.compute.features.extract_conv`` does when precision is bf16).
   Images per second, achieved GFLOP/s and the fraction of the conv ceiling of the same
   precision.
3. Accuracy: scenesweep's real pipeline (digits, 32 px, relu7, LinearSVC) with precision=fp32
   and precision=bf16; val and test accuracy of both and the cosine similarity of the features.
4. The ceiling that counts (``benchmarks/floor.py``): each conv layer of VGG16 timed alone at its
   own input shape, in the extraction's precision (and fp32), summed over the layers; measured
   before and after scenesweep's own extractor, which runs on a synthetic 15-Scene-shaped folder
   (``scenesweep.synthetic``) at the same image size and batch, decoding included: its images/s
   (what runs log as ``time/extract_images_per_s``) as a fraction of that ceiling, beside the
   eager conv stack alone on tensors (no decoding).

The conv-layer ceiling and the four VGG settings run round-robin (in each round, a few calls of
the conv layer in each precision, then one batch of each setting), so that a slow period caused
by another process on the machine is shared by all of them and the ratios stay meaningful.

Usage:
    .venv/bin/python benchmarks/extract.py [--image-size 224] [--batch-size 8] [--batches N]
                                           [--extractor-images N] [--quick]

Weights are random (torchvision's seeded initialisation): the timings do not depend on them,
but the accuracies are those of an untrained network.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn

# Run from a checkout without installing: put src/ on the path when scenesweep is not importable.
try:
    import scenesweep  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scenesweep.compute import backbone, features, hardware, synthetic, training
from scenesweep.core.config import make_config

# benchmarks/floor.py (the per-layer ceiling) and _common.py: the script's folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
from _common import digits_subset, flops_per_image, load_average, table  # noqa: E402

WARMUP = features.WARMUP_BATCHES  # leading batches / iterations left out of every timing


# --------------------------------------------------------------------------------------------
# Timing and FLOP counting
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


# --------------------------------------------------------------------------------------------
# 3. Accuracy through the real pipeline
# --------------------------------------------------------------------------------------------

def accuracy_check(device: torch.device, subset_per_class: int | None = None) -> dict[str, dict]:
    """fp32 vs bf16 through scenesweep's pipeline: digits, 32 px, relu7, LinearSVC (C=1).

    Uses a temporary cache_dir, so nothing is read from or left in the project's cache.

    Args:
        device: where the pipeline runs.
        subset_per_class: None for all 1797 digits (100 per class to train+val, the rest test);
            else only this many images per class, half of them to train+val (quicker, noisier).

    Returns:
        {"fp32": {...}, "bf16": {...}}, each with val/test accuracy, the resolved precision,
        extraction images/s (from the pipeline's own batch timings) and the (N, 4096) features.
    """
    results = {}
    with tempfile.TemporaryDirectory(prefix="scenesweep-bench-") as cache_dir:
        data, train_per_class = "digits", 100
        if subset_per_class is not None:
            data = str(digits_subset(Path(cache_dir), subset_per_class))
            train_per_class = subset_per_class // 2
        for precision in ("fp32", "bf16"):
            config = make_config("svm", {"data": data, "train_per_class": train_per_class,
                                         "image_size": 32, "layer": "relu7",
                                         "weights": "random", "precision": precision,
                                         "device": device.type, "cache_dir": cache_dir})
            began = time.perf_counter()
            prepared = training.prepare(config, progress=False)
            extract_s = time.perf_counter() - began
            result = training.fit_head(prepared, evaluate_test=True)
            results[precision] = {
                "val": result.metrics["val/acc"], "test": result.metrics["test/acc"],
                "precision": prepared.features.precision, "features": prepared.features.values,
                "images_per_s": prepared.features.extract_timing.get("images_per_s", float("nan")),
                "prepare_s": extract_s, "n": len(prepared.dataset.paths),
                "C": config.C, "batch_size": config.batch_size, "train_per_class": train_per_class,
            }
    return results


# --------------------------------------------------------------------------------------------
# 4. The extractor against the summed per-layer ceiling
# --------------------------------------------------------------------------------------------

def conv_stack_speed(device: torch.device, precision: str, image_size: int, batch_size: int,
                     batches: int) -> float:
    """Images/s of VGG16's eager conv stack on tensors, as extract_conv runs it (no decoding).

    The conv part of a random VGG16 in ``precision`` + channels_last, on a random
    (B, 3, S, S) batch; median of ``batches`` calls after the warm-up ones.
    """
    model = backbone.build_backbone("vgg16", "random")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.features.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size).to(device=device, dtype=dtype,
                                                              memory_format=torch.channels_last)
    seconds = time_repeats(lambda: backbone.trunk_forward(model, x), device, batches)  # (B, 512, S/32, S/32)
    return batch_size / statistics.median(seconds)


def extractor_speed(device: torch.device, image_size: int, batch_size: int, n_images: int) -> dict:
    """scenesweep's own extraction (``training.prepare``, precision auto) on a synthetic folder.

    About ``n_images`` synthetic 15-Scene-shaped JPEGs (grayscale, ~250 x 300 px: decoding and
    resizing as on the real set) in a temporary folder and cache. Returns the pipeline's own batch
    timing (``Features.extract_timing``: what a run logs as ``time/extract_*``, warm-up batches left
    out, decoding included), the resolved precision and the number of images.
    """
    scale = n_images / synthetic.TOTAL_IMAGES
    counts = synthetic.class_counts(scale, min_per_class=4)
    train_per_class = max(2, min(counts.values()) // 2)
    with tempfile.TemporaryDirectory(prefix="scenesweep-bench-") as tmp:
        root = synthetic.write_scenes(Path(tmp) / "scenes", scale=scale, min_per_class=4)
        config = make_config("svm", {"data": str(root), "train_per_class": train_per_class, "val_fraction": 0.5,
                                     "image_size": image_size, "batch_size": batch_size, "layer": "pool5",
                                     "weights": "random", "precision": "auto", "device": device.type,
                                     "cache_dir": str(Path(tmp) / "cache")})
        prepared = training.prepare(config, progress=False)
        return {"timing": dict(prepared.features.extract_timing), "precision": prepared.features.precision,
                "images": len(prepared.dataset.paths)}


def pooling_share_speed(device: torch.device, image_size: int, batch_size: int, n_images: int,
                        poolings: tuple[str, ...] = ("avg", "lp1", "lp2")) -> dict:
    """The pooling study's extractions: each pooling type in its own pass against one pass that
    runs the layers before the first pooling once per batch and branches into every pooling.

    The default is what Q12.3 extracts after Q8 (max is cached by then): avg, lp1 and lp2. Same
    synthetic JPEGs, precision auto, each pass in a fresh cache; the steady-state images/s of each
    (warm-up batches, which hold any compile, left out) gives the seconds per image of all poolings.
    """
    scale = n_images / synthetic.TOTAL_IMAGES
    with tempfile.TemporaryDirectory(prefix="scenesweep-bench-") as tmp:
        root = synthetic.write_scenes(Path(tmp) / "scenes", scale=scale, min_per_class=4)
        counts = synthetic.class_counts(scale, min_per_class=4)

        def config(pooling: str, cache: str):
            return make_config("svm", {"data": str(root), "train_per_class": max(2, min(counts.values()) // 2),
                                       "val_fraction": 0.5, "image_size": image_size, "batch_size": batch_size,
                                       "layer": "pool5", "pooling": pooling, "weights": "random",
                                       "device": device.type, "cache_dir": str(Path(tmp) / cache)})

        separate = {p: training.prepare(config(p, f"separate-{p}"), progress=False).features.extract_timing
                    for p in poolings}
        shared = training.prepare(config(poolings[0], "shared"), progress=False,
                                  share_poolings=poolings).features.extract_timing
    separate_s = sum(1.0 / t["images_per_s"] for t in separate.values())  # per image, all poolings
    shared_s = 1.0 / shared["images_per_s"]
    return {"poolings": poolings, "separate_images_per_s": {p: t["images_per_s"] for p, t in separate.items()},
            "shared_images_per_s": shared["images_per_s"], "separate_s_per_image": separate_s,
            "shared_s_per_image": shared_s, "saved": 1.0 - shared_s / separate_s,
            "compiled": shared.get("compiled", 0.0)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def describe_machine(device: torch.device) -> str:
    """One line: the machine (CPU model and speed flags, torch's capability, threads; the GPU on
    CUDA) and the precision ``precision=auto`` measures to be the faster here."""
    choice = features.choose_precision(make_config("svm", {"image_size": 224, "batch_size": 8}), device)
    return f"{hardware.describe(device)}; precision auto here: {choice.reason}"


def print_pooling_share(share: dict, images: int, image_size: int, batch_size: int) -> None:
    print(f"5. The pooling study's extractions ({', '.join(share['poolings'])}; max is cached by Q8), "
          f"{images} synthetic JPEGs, {image_size} px, batch {batch_size}, "
          f"{'compiled' if share['compiled'] else 'eager'}: each pooling in its own pass against one pass "
          "sharing the layers before the first pooling")
    print(table(["pass", "images/s", "s per image, all poolings"],
                [[f"{p} alone", f"{v:.1f}", ""] for p, v in share["separate_images_per_s"].items()]
                + [["apart, summed", "", f"{share['separate_s_per_image'] * 1e3:.1f} ms"],
                   ["one shared pass", f"{share['shared_images_per_s']:.1f}", f"{share['shared_s_per_image'] * 1e3:.1f} ms"]]))
    print(f"   sharing saves {share['saved']:.0%} of the pooling study's extraction\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image-size", type=int, default=None,
                        help="VGG input side in pixels (default 224, 112 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VGG batch")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"timed batches per setting, after {WARMUP} warm-up batches "
                             "(default 8, 3 with --quick)")
    parser.add_argument("--extractor-images", type=int, default=None,
                        help="synthetic images scenesweep's extractor runs on in part 4 (default 240, "
                             "64 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test in about a minute: 112 px, 3 batches, a 2048 matmul and "
                             "60 digits per class for the accuracy check")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda when present with 'auto'")
    parser.add_argument("--poolings-only", action="store_true",
                        help="only part 5: the pooling study's three extractions, apart against one shared pass")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 112 if args.quick else 224
    if args.batches is None:
        args.batches = 3 if args.quick else 8
    if args.extractor_images is None:
        args.extractor_images = 64 if args.quick else 240
    if args.image_size < 32 or args.batch_size < 1 or args.batches < 1:
        parser.error("expected --image-size >= 32, --batch-size >= 1 and --batches >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.resolve_device(args.device)
    started = time.perf_counter()
    print(f"scenesweep extraction benchmark{' (--quick)' if args.quick else ''}")
    print(describe_machine(device))
    print(f"Load average at start: {load_average()}")
    print("VGG16 weights are RANDOM (torchvision's seeded init): timings are representative, "
          "accuracies are those of an untrained network.")
    print(f"Timings: median of repeats, first {WARMUP} iterations/rounds left out. Other processes on "
          "the machine add noise; the conv ceiling and the VGG settings are interleaved to share it.\n")

    if args.poolings_only:
        print_pooling_share(pooling_share_speed(device, args.image_size, args.batch_size, args.extractor_images),
                            args.extractor_images, args.image_size, args.batch_size)
        print(f"Load average at end: {load_average()}")
        return 0

    # 1. Matmul reference (not interleaved: it is not in the ratios) -----------------------
    matmuls = matmul_ceilings(device, size=2048 if args.quick else 4096, repeats=3 if args.quick else 5)

    # 2. Conv ceiling + VGG16 settings, round-robin ----------------------------------------
    conv_flop, fc_flop = flops_per_image(args.image_size)
    per_image_gflop = (conv_flop + fc_flop) / 1e9
    model = backbone.build_backbone("vgg16", "random")  # fp32, eval mode, on the CPU
    settings = make_settings(model, device)
    del model
    ceilings = conv_ceilings(device)
    measure_rounds(ceilings, settings, device, args.image_size, args.batch_size, args.batches,
                   conv_calls=2 if args.quick else 3)
    conv_ceiling = {c.precision: c.gflops for c in ceilings}

    print("1. Ceiling: one kernel (the conv layer timed in the same rounds as VGG16 below)")
    print(table(["kernel", "precision", "GFLOP/call", "calls", "median ms", "GFLOP/s"],
                [[c.name, c.precision, f"{c.gflop:.1f}", str(len(c.seconds)), f"{c.median_s * 1e3:.1f}",
                  f"{c.gflops:.0f}"] for c in ceilings + matmuls]))
    print()

    reference = settings[0].first_output
    rows, speed, fraction = [], {}, {}
    for s in settings:
        stats = features.batch_timing_stats(s.seconds, [args.batch_size] * len(s.seconds))
        images_per_s = args.batch_size / stats["batch_median_s"]
        gflops = images_per_s * per_image_gflop
        speed[s.name] = images_per_s
        fraction[s.name] = gflops / conv_ceiling[s.precision]
        rows.append([s.name, f"{stats['batch_median_s'] * 1e3:.0f}", f"{stats['batch_p95_s'] * 1e3:.0f}",
                     f"{images_per_s:.1f}", f"{gflops:.0f}", f"{fraction[s.name]:.2f}",
                     f"{cosine(s.first_output, reference):.6f}"])
    print(f"2. VGG16 conv + fc6/fc7 to relu7, {args.image_size} px, batch {args.batch_size}, "
          f"{args.batches} timed batches per setting (round-robin), synthetic input")
    print(f"   {per_image_gflop:.2f} GFLOP per image (convs {conv_flop / 1e9:.2f}, fc6+fc7 {fc_flop / 1e9:.2f}, "
          f"{100 * fc_flop / (conv_flop + fc_flop):.1f} % fc)")
    print(table(["setting", "median ms/batch", "p95 ms", "images/s", "GFLOP/s",
                 "/ conv ceiling", "cos vs fp32"], rows))
    print("   '/ conv ceiling': against the conv layer of the same precision; "
          "'cos vs fp32': relu7 of the first batch.\n")
    del settings, ceilings

    # 3. Accuracy --------------------------------------------------------------------------
    acc = accuracy_check(device, subset_per_class=60 if args.quick else None)
    f32, b16 = acc["fp32"], acc["bf16"]
    x32, x16 = f32["features"], b16["features"]  # (N, 4096) relu7 each
    row_cos = np.sum(x32 * x16, axis=1) / (np.linalg.norm(x32, axis=1) * np.linalg.norm(x16, axis=1) + 1e-30)
    rel = float(np.linalg.norm(x32 - x16) / np.linalg.norm(x32))
    data = "all of digits" if not args.quick else "a digits subset (60 per class, --quick)"
    print(f"3. Accuracy, scenesweep pipeline (prepare + fit_head): {data}, {f32['n']} images, "
          f"{f32['train_per_class']} per class to train+val, 32 px, relu7, LinearSVC C={f32['C']:g} "
          f"on L2-normalised features, batch {f32['batch_size']}, RANDOM VGG16 weights")
    print(table(["precision", "val acc", "test acc", "extract images/s (incl. decoding)"],
                [[f"{name} (ran as {r['precision']})", f"{r['val']:.4f}", f"{r['test']:.4f}",
                  f"{r['images_per_s']:.1f}"] for name, r in (("fp32", f32), ("bf16", b16))]))
    print(f"   relu7 features fp32 vs bf16 ({x32.shape[0]} x {x32.shape[1]}): cosine "
          f"{cosine(x32, x16):.6f} (whole matrix), min per image {row_cos.min():.6f}, "
          f"relative L2 difference {rel:.2e}\n")

    # 4. The summed per-layer ceiling, before and after the extractor ----------------------
    precision = features.choose_precision(make_config("svm", {"image_size": args.image_size,
                                                             "batch_size": args.batch_size}), device).precision
    repeats = 3 if args.quick else 5
    layer_ceiling = floor.conv_ceiling("vgg16", args.image_size, args.batch_size, precision, device, repeats)
    fp32_ceiling = (floor.conv_ceiling("vgg16", args.image_size, args.batch_size, "fp32", device, repeats)
                    if precision != "fp32" else None)
    stack = conv_stack_speed(device, precision, args.image_size, args.batch_size, args.batches)
    extractor = extractor_speed(device, args.image_size, args.batch_size, args.extractor_images)
    layer_ceiling = layer_ceiling.combined(
        floor.conv_ceiling("vgg16", args.image_size, args.batch_size, precision, device, repeats))
    ceilings_shown = [layer_ceiling] + ([fp32_ceiling] if fp32_ceiling is not None else [])
    timing = extractor["timing"]
    extractor_ips = timing.get("images_per_s", float("nan"))
    extractor_fraction = extractor_ips / layer_ceiling.images_per_s
    print(f"4. The ceiling that counts: each conv layer of VGG16 alone at its own input shape, "
          f"{args.image_size} px, batch {args.batch_size}, channels_last, summed "
          f"(the {precision} one measured before and after the extractor, repeats pooled)")
    print(floor.format_ceilings(ceilings_shown))
    print(table(["what", "images/s", "/ layer-sum ceiling"], [
        [f"layer-sum ceiling ({precision})", f"{layer_ceiling.images_per_s:.1f}", "1.00"],
        [f"eager conv stack ({precision}, tensors, no decoding)", f"{stack:.1f}",
         f"{stack / layer_ceiling.images_per_s:.2f}"],
        [f"scenesweep extractor (ran as {extractor['precision']}, {extractor['images']} synthetic JPEGs, "
         "decoding included)", f"{extractor_ips:.1f}", f"{extractor_fraction:.2f}"]]))
    print(f"   extractor: median {timing.get('batch_median_s', float('nan')) * 1e3:.0f} ms per batch, "
          f"p95 {timing.get('batch_p95_s', float('nan')) * 1e3:.0f} ms, over {timing.get('batches', 0):.0f} "
          f"batches (warm-up left out); its images/s is what runs log as time/extract_images_per_s")
    print(f"   decoding {timing.get('decode_s', float('nan')):.1f} s (its thread), forward passes "
          f"{timing.get('compute_s', float('nan')):.1f} s, waiting for decoded batches "
          f"{timing.get('wait_s', float('nan')):.1f} s, in {timing.get('total_s', float('nan')):.1f} s: "
          f"{timing.get('decode_overlap', float('nan')):.0%} of the decoding hidden behind the forward pass "
          f"(time/extract_decode_overlap)\n")

    # 5. The pooling study's extractions, apart or sharing their first layers ----------------
    share = pooling_share_speed(device, args.image_size, args.batch_size, args.extractor_images)
    print_pooling_share(share, args.extractor_images, args.image_size, args.batch_size)

    # Summary ------------------------------------------------------------------------------
    base, cl = speed["fp32"], speed["fp32 channels_last"]
    whole, auto = speed["bf16 whole model + channels_last"], speed["bf16 autocast + channels_last"]
    print(f"Load average at end: {load_average()}; {time.perf_counter() - started:.0f} s in all")
    print(f"Summary ({args.image_size} px, batch {args.batch_size}): "
          f"bf16 whole-model / fp32 = {whole / base:.2f}x, "
          f"bf16 whole-model / fp32 channels_last = {whole / cl:.2f}x, "
          f"bf16 autocast / fp32 channels_last = {auto / cl:.2f}x, "
          f"fp32 channels_last / fp32 = {cl / base:.2f}x; "
          f"fraction of conv ceiling = {fraction['fp32 channels_last']:.2f} (fp32 channels_last), "
          f"{fraction['bf16 whole model + channels_last']:.2f} (bf16 whole model); "
          f"conv ceiling bf16 / fp32 = {conv_ceiling['bf16'] / conv_ceiling['fp32']:.2f}x; "
          f"test acc bf16 - fp32 = {b16['test'] - f32['test']:+.4f}; "
          f"extractor / summed conv-layer ceiling ({precision}) = {extractor_fraction:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
