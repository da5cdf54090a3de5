"""Parts 3 to 5 of ``benchmarks/extract.py``: what runs through scenesweep's own pipeline.

bf16 against fp32 accuracy (``accuracy_check``), the extractor on synthetic JPEGs beside the eager
conv stack on tensors (``extractor_speed``, ``conv_stack_speed``), and the pooling study's
extractions apart or sharing their first layers (``pooling_share_speed``).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import digits_subset  # first: it puts src/ on the path when needed

import torch

from scenesweep.compute import backbone, synthetic, training
from scenesweep.core.config import make_config

from extract_kernels import time_repeats


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


# --------------------------------------------------------------------------------------------
# 5. The pooling study's extractions, apart or sharing their first layers
# --------------------------------------------------------------------------------------------

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
