"""Feature extraction with a content-keyed, atomic, self-checking cache.

Two kinds of entries, so that expensive work is done once:
  * conv entries: the trunk's output of every image of a dataset (VGG: (N, 512, h, w); a
    global-pooling family: its map before the pooling; ViT: the class token), keyed by the
    dataset manifest, weights identity, arch, pooling, transform (image size) and precision.
    This is ~95 % of the cost; C, the head, the layer and the fc widths do not change it.
  * layer entries: a feature layer (VGG's pool5/fc6/relu6/fc7/relu7, ResNet's layer4/pool, ...)
    computed from a conv entry, keyed by the conv key, the layer and (for fc layers) the fc
    width and the seed of new fc layers.
Features are stored for every image of the dataset, so a different train/val/test split (seed,
val_fraction) reuses them; the split is applied by indexing.

Each entry is ``<key>.npy`` plus ``<key>.json`` (shape, dtype, sha256, how it was made). Both
are written to a temporary file and renamed; the JSON is written last and is the commit mark.
A missing, truncated or corrupt entry is detected on load and recomputed. The cache itself (keys,
entries, the in-process memo) is ``compute.feature_cache``; this module extracts and orchestrates.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core.backbone_families import family_of
from ..core.config import RunConfig
from ..core.errors import UserError, first_line
from ..core.progress import progress_bar
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from . import backbone, extractor, precision
from .data import Dataset
from .hardware import resolve_device
from .feature_cache import cache_key, conv_key_parts, feature_cache, layer_key_parts

WARMUP_BATCHES = 2  # left out of timing statistics: allocator and kernel selection warm up


def choose_precision(config: RunConfig, device: torch.device) -> precision.PrecisionChoice:
    """The extraction precision of ``config``: as given, or for "auto" the faster one measured on
    this machine at the run's image size and batch (kept in the cache folder)."""
    return precision.choose_extraction(
        config.precision, lambda: backbone.trunk(backbone.architecture(config.arch, image_size=config.image_size)),
        config.arch, config.image_size, config.batch_size, device, config.cache_path)


def batch_timing_stats(seconds: list[float], images: list[int], warmup: int = WARMUP_BATCHES) -> dict[str, float]:
    """Mean, median and p95 seconds per batch and images per second, warm-up batches left out.

    With fewer batches than ``warmup + 1`` every batch is kept, so that small runs still report.
    """
    if not seconds:
        return {}
    keep = slice(warmup, None) if len(seconds) > warmup else slice(None)
    kept = np.asarray(seconds[keep], dtype=np.float64)
    count = float(np.sum(images[keep]))
    return {"batch_mean_s": float(kept.mean()), "batch_median_s": float(np.median(kept)),
            "batch_p95_s": float(np.percentile(kept, 95)),
            "images_per_s": count / float(kept.sum()) if kept.sum() > 0 else float("nan"),
            "batches": float(len(kept))}


@dataclasses.dataclass
class Features:
    """Features of every image of a dataset, with where they came from.

    Attributes:
        values: (N, D) float32, rows in dataset order.
        key: cache key of the layer entry; conv_key: of the conv entry.
        hit: the layer entry was read from the cache.
        conv_state: "miss" (the convolutions ran), "hit" (read from the conv entry) or
            "absent" (the layer entry was a hit and no conv entry exists any more: none needed).
        extract_timing: per-batch statistics of the conv extraction (measured when the conv
            entry was computed, possibly by an earlier run: see conv_state).
        precision, device: what the extraction ran with (the device resolved once for the run:
            everything after the features reads it from here); precision_reason: why that precision
            (measured, cached or given: see ``compute.precision``).
        read_s: seconds this call spent reading cache entries; layer_s: computing the layer
            from the conv output (0.0 when the layer entry was read).
    """

    values: np.ndarray
    key: str
    conv_key: str
    hit: bool
    conv_state: str
    extract_timing: dict[str, float]
    precision: str
    device: torch.device
    precision_reason: str = ""
    read_s: float = 0.0
    layer_s: float = 0.0

    @property
    def conv_hit(self) -> bool:
        return self.conv_state != "miss"

    def stage_timing(self) -> dict[str, dict[str, float]]:
        """What this run spent getting its features, by stage: ``extract`` (per-batch statistics)
        only when the convolutions ran here; ``cache`` (``read_s``) when entries were read;
        ``layer`` (``s``) when the layer was computed from conv output. A cache hit thus logs its
        read, never the figures of the extraction that filled the cache (``cache_tags`` names those)."""
        timing: dict[str, dict[str, float]] = {}
        if not self.conv_hit:
            timing["extract"] = dict(self.extract_timing)
        if self.hit or self.conv_state == "hit":
            timing["cache"] = {"read_s": self.read_s}
        if not self.hit:
            timing["layer"] = {"s": self.layer_s}
        return timing


def extract_conv(model: torch.nn.Module, dataset: Dataset, image_size: int, arch: str, batch_size: int,
                 device: torch.device, precision: str, progress: bool = True,
                 indices: np.ndarray | None = None, cache_dir: Path | None = None,
                 poolings: tuple[str, ...] = ()) -> tuple[np.ndarray | tuple[np.ndarray, ...], dict[str, float]]:
    """Run the convolutional part over images: returns (N, 512, h, w) float32 and batch timings;
    with ``poolings``, one such array per pooling type, their shared trunk run once per batch.

    Decoding runs in a background thread, overlapping the forward pass; the conv part is
    compiled when it pays (see ``extractor``). Timings: per-batch seconds with decoding (warm-up
    batches, which hold the compile, left out); the seconds spent decoding (the thread), in the
    forward passes and waiting for decoded batches, with the share of decoding hidden behind the
    forward pass (``decode_overlap``); whether it ran compiled.
    """
    order = np.arange(len(dataset.paths)) if indices is None else np.asarray(indices)
    resize, crop, interpolation = extractor.transform_sizes(arch, image_size)
    module, mode = extractor.compile_or_eager(model, arch, device, precision, len(order), image_size, cache_dir,
                                              poolings)
    shown = f", poolings {'+'.join(poolings)}" if poolings else ""
    bar = progress_bar(total=len(order), desc=f"extract {arch}/{image_size}px ({mode}{shown})", unit="img",
               disable=not progress)
    began = time.perf_counter()
    try:
        out, seconds, counts, spent = extractor.run_batches(module, dataset, order, batch_size, resize, crop,
                                                            device, on_batch=bar.update, interpolation=interpolation)
    except UserError:
        raise
    except Exception as error:  # the compiled graph failed at its first call: eager is correct
        if mode != "compiled":
            raise
        print(f"note: the compiled conv part failed ({error.__class__.__name__}: {first_line(error, 120)}); "
              "extracting eagerly", file=sys.stderr)
        bar.reset()
        module, mode = extractor.runner(model, arch, device, precision, False, cache_dir, poolings)
        out, seconds, counts, spent = extractor.run_batches(module, dataset, order, batch_size, resize, crop,
                                                            device, on_batch=bar.update, interpolation=interpolation)
    bar.close()
    timing = batch_timing_stats(seconds, counts)
    total_s = time.perf_counter() - began
    # decode_s + compute_s > total_s by what ran at once: decode_overlap 1.0 = decoding fully hidden.
    timing.update({"total_s": total_s, **spent, "compiled": float(mode == "compiled"),
                   "decode_overlap": extractor.overlap(spent["decode_s"], spent["compute_s"], total_s),
                   "branches": float(max(1, len(poolings)))})
    if isinstance(out, tuple):
        return tuple(o.astype(np.float32, copy=False) for o in out), timing
    return out.astype(np.float32, copy=False), timing


def layer_from_conv(model: torch.nn.Module, conv_out: np.ndarray, layer: str, device: torch.device,
                    precision: str = "fp32", chunk: int = 256) -> np.ndarray:
    """The trunk's output (VGG: (N, 512, h, w)) -> (N, D) features of ``layer``, float32.

    VGG's fc6/fc7 run in the extraction precision (bf16 fc6 is 0.9 TFLOP for 4485 images, five
    times quicker than fp32 on AMX), as the served model runs them.
    """
    backbone.to_inference(model, device, precision, layer)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(conv_out), chunk):
            block = torch.from_numpy(conv_out[start:start + chunk]).to(device)
            parts.append(backbone.from_trunk(model, block, layer).cpu().numpy())
    return np.concatenate(parts).astype(np.float32, copy=False)


# The last network built in this process, by what it was built from: a sweep's trials that need
# new layer entries (another layer, C on a new width) reuse it instead of initialising 138 M
# parameters again (about 1 s each).
_BUILT: dict[tuple, torch.nn.Module] = {}


def built_backbone(config: RunConfig, device: torch.device, precision: str) -> torch.nn.Module:
    key = (config.arch, backbone.weights_identity(config.weights, config.arch, config.seed), config.pooling,
           config.fc_width, config.seed, config.image_size, str(device), precision)
    if key not in _BUILT:
        _BUILT.clear()  # one at a time: a VGG16 is 550 MB
        _BUILT[key] = backbone.build_configured(config)
    return _BUILT[key]


def compute_features(config: RunConfig, dataset: Dataset, progress: bool = True,
                     share_poolings: tuple[str, ...] = (), device: torch.device | None = None) -> Features:
    """Features of ``config.layer`` for every image, from the cache when it holds them.

    Args:
        device: the run's device, resolved once by its caller (None: from ``config.device``).
        share_poolings: pooling types a study will need next (a pooling sweep's choices): when the
            convolutions must run and some of these have no conv entry either, one pass fills them
            all, the layers before the first pooling run once per batch (``backbone.PoolingBranches``).
    """
    device = device or resolve_device(config.device)
    choice = choose_precision(config, device)
    precision = choice.precision
    cache = feature_cache(config.cache_path)
    conv_key = cache_key(conv_key_parts(config, dataset, precision))
    key = cache_key(layer_key_parts(config, conv_key))

    began = time.perf_counter()
    stored = cache.load(key)
    conv_stored = cache.load(conv_key) if stored is None else None
    read_s = time.perf_counter() - began
    model = None
    if stored is not None:
        values, meta = stored
        # The layer entry records the conv timing too: a damaged or deleted conv entry does not matter.
        conv_meta = cache.meta(conv_key)
        timing = (conv_meta or meta).get("timing", {})
        return Features(values, key, conv_key, True, "hit" if conv_meta is not None else "absent", timing,
                        precision, device, choice.reason, read_s=read_s)
    if conv_stored is not None:
        conv_out, conv_meta = conv_stored
        conv_state = "hit"
    else:
        model = built_backbone(config, device, precision)
        # Other poolings the study will need and nobody has extracted yet: in the same pass.
        # (Only where the pooling is inside the trunk: otherwise one trunk entry serves them all.)
        others = tuple(p for p in dict.fromkeys(share_poolings) if p != config.pooling
                       and family_of(config.arch).pools_in_trunk and p in family_of(config.arch).poolings
                       and cache.meta(cache_key(conv_key_parts(config.replace(pooling=p), dataset, precision))) is None)
        poolings = (config.pooling, *others) if others else ()
        conv_out, timing = extract_conv(model, dataset, config.image_size, config.arch, config.batch_size,
                                        device, precision, progress, cache_dir=config.cache_path, poolings=poolings)
        if poolings:
            for pooling, out in zip(poolings[1:], conv_out[1:]):
                other = config.replace(pooling=pooling)
                cache.save(cache_key(conv_key_parts(other, dataset, precision)), out,
                           {"parts": conv_key_parts(other, dataset, precision), "timing": timing,
                            "device": str(device), "extracted_with": list(poolings)})
            conv_out = conv_out[0]
        conv_meta = cache.save(conv_key, conv_out, {"parts": conv_key_parts(config, dataset, precision),
                                                    "timing": timing, "device": str(device)})
        conv_state = "miss"
    if model is None:
        model = built_backbone(config, device, precision)
    layer_began = time.perf_counter()
    values = layer_from_conv(model, conv_out, config.layer, device, precision)
    layer_s = time.perf_counter() - layer_began
    cache.save(key, values, {"parts": layer_key_parts(config, conv_key), "timing": conv_meta.get("timing", {})})
    return Features(values, key, conv_key, False, conv_state, conv_meta.get("timing", {}), precision, device,
                    choice.reason, read_s=read_s if conv_state == "hit" else 0.0, layer_s=layer_s)
