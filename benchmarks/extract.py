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
The kernels of parts 1 and 2 are in ``extract_kernels.py``, the pipeline runs of parts 3 to 5 in
``extract_pipeline.py``; this script measures and prints them in order.

Usage:
    .venv/bin/python benchmarks/extract.py [--image-size 224] [--batch-size 8] [--batches N]
                                           [--extractor-images N] [--quick]

Weights are random (torchvision's seeded initialisation): the timings do not depend on them,
but the accuracies are those of an untrained network.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Run from a checkout without installing: put src/ on the path when scenesweep is not importable.
try:
    import scenesweep  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scenesweep.compute import backbone, features, hardware
from scenesweep.core.config import make_config

# benchmarks/floor.py (the per-layer ceiling), _common.py and this script's extract_*.py: the
# script's folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
from _common import flops_per_image, load_average, table  # noqa: E402
from extract_kernels import (WARMUP, Ceiling, Setting, conv_ceilings, cosine, make_settings,  # noqa: E402
                             matmul_ceilings, measure_rounds)
from extract_pipeline import accuracy_check, conv_stack_speed, extractor_speed, pooling_share_speed  # noqa: E402


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


def print_header(args: argparse.Namespace, device: torch.device) -> None:
    """What runs, on which machine and under which load, and how the timings are taken."""
    print(f"scenesweep extraction benchmark{' (--quick)' if args.quick else ''}")
    print(describe_machine(device))
    print(f"Load average at start: {load_average()}")
    print("VGG16 weights are RANDOM (torchvision's seeded init): timings are representative, "
          "accuracies are those of an untrained network.")
    print(f"Timings: median of repeats, first {WARMUP} iterations/rounds left out. Other processes on "
          "the machine add noise; the conv ceiling and the VGG settings are interleaved to share it.\n")


def measure_kernels(args: argparse.Namespace,
                    device: torch.device) -> tuple[list[Ceiling], list[Ceiling], list[Setting]]:
    """Parts 1 and 2 timed: (conv ceilings, matmul ceilings, VGG16 settings), seconds filled in."""
    # 1. Matmul reference (not interleaved: it is not in the ratios) -----------------------
    matmuls = matmul_ceilings(device, size=2048 if args.quick else 4096, repeats=3 if args.quick else 5)

    # 2. Conv ceiling + VGG16 settings, round-robin ----------------------------------------
    model = backbone.build_backbone("vgg16", "random")  # fp32, eval mode, on the CPU
    settings = make_settings(model, device)
    del model
    ceilings = conv_ceilings(device)
    measure_rounds(ceilings, settings, device, args.image_size, args.batch_size, args.batches,
                   conv_calls=2 if args.quick else 3)
    return ceilings, matmuls, settings


def report_kernels(args: argparse.Namespace,
                   device: torch.device) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Parts 1 and 2 measured and printed. Returns each setting's images/s and fraction of the conv
    ceiling of its precision, and that ceiling's GFLOP/s per precision. The settings' models and
    the ceiling layers go with this call, before part 3."""
    ceilings, matmuls, settings = measure_kernels(args, device)
    conv_ceiling = {c.precision: c.gflops for c in ceilings}

    print("1. Ceiling: one kernel (the conv layer timed in the same rounds as VGG16 below)")
    print(table(["kernel", "precision", "GFLOP/call", "calls", "median ms", "GFLOP/s"],
                [[c.name, c.precision, f"{c.gflop:.1f}", str(len(c.seconds)), f"{c.median_s * 1e3:.1f}",
                  f"{c.gflops:.0f}"] for c in ceilings + matmuls]))
    print()
    speed, fraction = report_settings(args, settings, conv_ceiling)
    return speed, fraction, conv_ceiling


def report_settings(args: argparse.Namespace, settings: list[Setting],
                    conv_ceiling: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Part 2's table; returns each setting's images/s and fraction of the conv ceiling."""
    conv_flop, fc_flop = flops_per_image(args.image_size)
    per_image_gflop = (conv_flop + fc_flop) / 1e9
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
    return speed, fraction


def report_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Part 3 run and printed; returns ``accuracy_check``'s results."""
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
    return acc


def report_layer_ceiling(args: argparse.Namespace, device: torch.device) -> tuple[str, float]:
    """Part 4 measured and printed: the summed per-layer ceiling (before and after the extractor),
    the eager conv stack and scenesweep's extractor. Returns the extraction's precision and the
    extractor's fraction of that ceiling."""
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
    print_extractor_timing(timing)
    return precision, extractor_fraction


def print_extractor_timing(timing: dict) -> None:
    """Part 4's last lines: the extractor's own batch timing and how much decoding it hid."""
    print(f"   extractor: median {timing.get('batch_median_s', float('nan')) * 1e3:.0f} ms per batch, "
          f"p95 {timing.get('batch_p95_s', float('nan')) * 1e3:.0f} ms, over {timing.get('batches', 0):.0f} "
          f"batches (warm-up left out); its images/s is what runs log as time/extract_images_per_s")
    print(f"   decoding {timing.get('decode_s', float('nan')):.1f} s (its thread), forward passes "
          f"{timing.get('compute_s', float('nan')):.1f} s, waiting for decoded batches "
          f"{timing.get('wait_s', float('nan')):.1f} s, in {timing.get('total_s', float('nan')):.1f} s: "
          f"{timing.get('decode_overlap', float('nan')):.0%} of the decoding hidden behind the forward pass "
          f"(time/extract_decode_overlap)\n")


def print_summary(args: argparse.Namespace, started: float, speed: dict[str, float], fraction: dict[str, float],
                  conv_ceiling: dict[str, float], acc: dict[str, dict], precision: str,
                  extractor_fraction: float) -> None:
    """The last lines: load, total time, and the ratios of every part in one line."""
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
          f"test acc bf16 - fp32 = {acc['bf16']['test'] - acc['fp32']['test']:+.4f}; "
          f"extractor / summed conv-layer ceiling ({precision}) = {extractor_fraction:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.resolve_device(args.device)
    started = time.perf_counter()
    print_header(args, device)

    if args.poolings_only:
        print_pooling_share(pooling_share_speed(device, args.image_size, args.batch_size, args.extractor_images),
                            args.extractor_images, args.image_size, args.batch_size)
        print(f"Load average at end: {load_average()}")
        return 0

    # 1. Matmul reference, 2. conv ceiling + VGG16 settings round-robin (their models freed after)
    speed, fraction, conv_ceiling = report_kernels(args, device)

    # 3. Accuracy --------------------------------------------------------------------------
    acc = report_accuracy(args, device)

    # 4. The summed per-layer ceiling, before and after the extractor ----------------------
    precision, extractor_fraction = report_layer_ceiling(args, device)

    # 5. The pooling study's extractions, apart or sharing their first layers ----------------
    share = pooling_share_speed(device, args.image_size, args.batch_size, args.extractor_images)
    print_pooling_share(share, args.extractor_images, args.image_size, args.batch_size)

    # Summary ------------------------------------------------------------------------------
    print_summary(args, started, speed, fraction, conv_ceiling, acc, precision, extractor_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
