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

The measurements live beside this script: the conv-layer ceiling in ``floor_ceiling.py``, the head
step in ``floor_head.py`` (the device helpers both use in ``floor_device.py``); every name the other
benchmarks use as ``floor.<name>`` is importable from here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import load_average, table  # noqa: E402,F401  (puts src/ on the path when needed)

from scenesweep.compute import hardware  # noqa: E402  (the machine)

from floor_ceiling import (  # noqa: E402,F401  (the conv-layer ceiling, as floor.<name>)
    PRECISIONS, STATISTICS, ConvCeiling, LayerTiming, conv_ceiling, conv_layers, format_ceilings)
from floor_device import resolve_device, sync  # noqa: E402,F401  (as floor.<name>)
from floor_head import (  # noqa: E402,F401  (the bare head step, as floor.<name>)
    HeadStep, head_op_ceiling, head_step, mlp, process_settings)


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
