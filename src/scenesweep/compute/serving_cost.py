"""What a trial's servable model costs: its size on disk and its prediction time per image.

A study may weigh accuracy against cost (``objectives:``, ``constraints:``), so each trial is
judged on what its registered model would cost, without registering it:

* size: the backbone's tensors up to the feature layer, in the precision they are stored in
  (counted on the meta device: no weights are made), plus the head as pickled and the package's
  code that every model carries (``models.logged.model_size_mb`` adds those);
* time: measured as the served model runs one image: decode the image file, the weights' own
  preprocessing, the backbone up to the layer at batch 1 in the serving precision. The backbone's
  part does not depend on the trial's head, C or data, so it is measured once per architecture,
  pooling, fc width, layer, image size, precision and machine, and kept in the cache folder like
  the precision probe (``<cache>/predict_cost/<key>.json``, written atomically). The head's part
  (a matrix product, or the mlp's three) is timed per trial on its own (milliseconds).

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import UserError
from . import backbone
from .atomic_files import atomic_write
from .data import read_image
from .precision import machine_identity

COST_FORMAT = 2  # 2: the fastest call, not the median
# Untimed and timed predictions of one image; the fastest is kept (another process's load only
# ever slows a call down). It cannot undo a busy machine: beside a second process computing on
# both cores, VGG16's pool5 at 32 px took 272 ms per image on every call against 15 ms idle (AMD
# EPYC, 2 cores: torch's threads wait on each other). The figure is kept for every later trial:
# measure on an idle machine, or remove <cache>/predict_cost/ to measure again.
WARMUP, REPEATS = 2, 7
_MEMO: dict[str, float] = {}
_BYTES: dict[tuple, int] = {}


def backbone_bytes(arch: str, pooling: str | None, fc_width: int, layer: str, image_size: int, precision: str) -> int:
    """Bytes of the tensors a servable model stores for its backbone: those ``layer`` needs
    (``backbone.tap_state_keys``), floating-point ones in ``precision`` ("fp32" or "bf16")."""
    key = (arch, pooling, fc_width, layer, image_size, precision)
    if key not in _BYTES:
        model = backbone.shared_structure(arch, pooling, fc_width, image_size)  # meta device: shapes only
        state = model.state_dict()
        size = 2 if precision == "bf16" else 4
        _BYTES[key] = sum(state[k].numel() * (size if state[k].is_floating_point() else state[k].element_size())
                          for k in backbone.tap_state_keys(model, layer, state.keys()))
    return _BYTES[key]


def _image_file(image_size: int) -> bytes:
    """A PNG a little larger than the input (as photos are): what a client sends, base64 aside."""
    side = int(image_size * 1.15) + 1
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def measure_backbone_ms(arch: str, pooling: str | None, fc_width: int, layer: str, image_size: int,
                        precision: str, device: torch.device, network: torch.nn.Module | None = None) -> float:
    """Milliseconds (the fastest of ``REPEATS``) to turn one image file into its (1, D) features, as the served model
    does (``models.pyfunc.ImageClassifier.features`` at batch 1). Random weights: the time does
    not depend on their values; ``network``: one built already (this process's extraction's)."""
    model = network if network is not None else backbone.build_backbone(arch, "random", pooling, fc_width, 0,
                                                                        image_size)
    model = backbone.to_inference(model, device, precision, layer)
    dtype = backbone.compute_dtype(precision)
    transform = backbone.preprocessing(arch, image_size)
    data = _image_file(image_size)
    timings = []
    with torch.inference_mode():
        for call in range(WARMUP + REPEATS):
            began = time.perf_counter()
            pixels = transform(read_image(data=data))  # (3, S, S)
            x = pixels[None].to(device=device, dtype=dtype, memory_format=torch.channels_last)  # (1, 3, S, S)
            backbone.from_trunk(model, backbone.trunk_forward(model, x), layer).cpu()  # (1, D)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if call >= WARMUP:
                timings.append(time.perf_counter() - began)
    return 1000.0 * min(timings)


def backbone_ms(arch: str, pooling: str | None, fc_width: int, layer: str, image_size: int, precision: str,
                device: torch.device, cache_dir: Path | None, network=None) -> tuple[float, str]:
    """The backbone's part of a prediction per image (ms), measured once and kept.

    Returns:
        (milliseconds, "measured" or "cached").
    """
    key_parts = {"format": COST_FORMAT, "arch": arch, "pooling": pooling, "fc_width": fc_width, "layer": layer,
                 "image_size": image_size, "precision": precision, "machine": machine_identity(device)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    if key in _MEMO:
        return _MEMO[key], "cached"
    path = Path(cache_dir) / "predict_cost" / f"{key}.json" if cache_dir is not None else None
    if path is not None:
        try:
            stored = json.loads(path.read_text())
            if stored.get("key_parts") == key_parts:
                _MEMO[key] = float(stored["ms_per_image"])
                return _MEMO[key], "cached"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # missing or damaged: measured again
    ms = measure_backbone_ms(arch, pooling, fc_width, layer, image_size, precision, device, network)
    _MEMO[key] = ms
    if path is not None:
        record = {"key_parts": key_parts, "ms_per_image": ms, "measured_at": time.time()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda handle: handle.write(json.dumps(record, indent=1).encode()))
        except (OSError, UserError):
            pass  # a read-only or full cache only means measuring again next time
    return ms, "measured"


def head_ms(head, width: int) -> float:
    """Milliseconds (the fastest of ``REPEATS``) of the head's scores for one (1, D) feature vector."""
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    timings = []
    for call in range(WARMUP + REPEATS):
        began = time.perf_counter()
        head.predict_scores(x)
        if call >= WARMUP:
            timings.append(time.perf_counter() - began)
    return 1000.0 * min(timings)
