"""Running the convolutional part over a dataset near the machine's limit.

* Images are decoded, resized and centre-cropped (the weights' own transform, on PIL images) into
  uint8 (B, S, S, 3) batches by a background thread, so decoding overlaps the forward pass (Pillow
  releases the GIL while it decodes and resizes); on CUDA the batch goes through pinned memory
  with a non-blocking copy.
* The uint8 -> float conversion, the ImageNet normalisation (in fp32, as torchvision does) and
  the cast to the compute dtype happen in the same graph as the convolutions: an NHWC uint8 batch
  permuted to NCHW is already channels_last, and the compiler fuses it all into one kernel.
* The convolutional part is compiled (``torch.compile``, inductor with freezing) when a C++
  compiler is present and the extraction is large enough to pay back the compile; the compiled
  artefact is kept in inductor's FX graph cache under the feature cache (``<cache>/inductor``),
  so a second process compiles again in seconds. A short last batch is padded to the full size
  (a new shape would recompile). When compiling is unavailable or fails, it runs eagerly and
  says so in one line.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import nn

from ..core.errors import first_line
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from . import backbone
from .data import Dataset, read_image

# Compile when the extraction is at least this many 224-px-equivalent images: below it, the first
# compile (15 to 20 s on 2 cores; 3 to 5 s from the FX graph cache) costs more than it saves.
COMPILE_MIN_IMAGES_224 = 400
COMPILE_ENV = "SCENESWEEP_COMPILE"  # "0": never compile, "1": always (tests), unset: when it pays
PREFETCH_BATCHES = 2  # decoded batches waiting for the forward pass


def transform_sizes(arch: str, image_size: int) -> tuple[int, int, TF.InterpolationMode]:
    """(resize, crop, interpolation) of the weights' own transform at ``image_size`` (VGG16:
    256 -> 224 bilinear at 224)."""
    transform = backbone.preprocessing(arch, image_size)
    return transform.resize_size[0], transform.crop_size[0], transform.interpolation


def load_pixels(path: Path, resize: int, crop: int,
                interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR) -> np.ndarray:
    """One image file -> (crop, crop, 3) uint8: RGB (grayscale repeated), resized so that its
    shorter side is ``resize`` (the weights' interpolation, antialiased), centre-cropped: the
    weights' transform before its float conversion and normalisation."""
    # Grayscale (all of 15-Scene) is resized as one channel and repeated after: the same pixels as
    # resizing its RGB copy (PIL resamples each band alike), a third of the work.
    image = read_image(path, keep_gray=True)
    image = TF.resize(image, [resize], interpolation=interpolation, antialias=True)
    pixels = np.asarray(TF.center_crop(image, [crop, crop]), dtype=np.uint8)  # (S, S) or (S, S, 3)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def batches(dataset: Dataset, order: np.ndarray, batch_size: int, resize: int, crop: int,
            pin: bool = False, interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR,
            ) -> Iterator[tuple[torch.Tensor, int, float]]:
    """(uint8 batch (B, S, S, 3), images in it, seconds spent decoding it), decoded by a thread.

    The last batch is padded (repeating its last image) to ``batch_size``: the second value
    says how many images are real.
    """
    work: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()

    def produce() -> None:
        try:
            for start in range(0, len(order), batch_size):
                began = time.perf_counter()
                chunk = [int(i) for i in order[start:start + batch_size]]
                pixels = np.stack([load_pixels(dataset.absolute(i), resize, crop, interpolation) for i in chunk])
                if len(chunk) < batch_size:
                    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(chunk), axis=0)])
                batch = torch.from_numpy(pixels)
                if pin:
                    batch = batch.pin_memory()
                item = (batch, len(chunk), time.perf_counter() - began)
                while not stop.is_set():
                    try:
                        work.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # a bad image: raised in the consumer, with its message
            work.put(error)
            return
        work.put(None)

    thread = threading.Thread(target=produce, daemon=True, name="decode")
    thread.start()
    try:
        while True:
            item = work.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


class Normalised(nn.Module):
    """uint8 (B, S, S, 3) -> the trunk's output (VGG: (B, 512, S/32, S/32)) in float32.

    The permute makes an NCHW view with channels_last strides (no copy); the normalisation is
    fp32, as torchvision's transform does it, then cast to the compute dtype.
    """

    def __init__(self, features: nn.Module, dtype: torch.dtype, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.features = features
        self.dtype = dtype
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift  # (B, 3, S, S), channels_last
        out = self.features(x.to(self.dtype))  # (B, 512, S/32, S/32), or one per pooling branch
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def should_compile(images: int, image_size: int) -> bool:
    """Whether compiling pays for this extraction (``SCENESWEEP_COMPILE`` overrides: 0 or 1)."""
    forced = os.environ.get(COMPILE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1" and compiler_available()
    return compiler_available() and images * (image_size / 224) ** 2 >= COMPILE_MIN_IMAGES_224


def runner(model: nn.Module, arch: str, device: torch.device, precision: str, compile_graph: bool,
           cache_dir: Path | None, poolings: tuple[str, ...] = ()) -> tuple[nn.Module, str]:
    """The conv part behind its normalisation, compiled when asked and possible; with
    ``poolings``, one output per pooling type from a shared trunk (``backbone.PoolingBranches``).

    Returns:
        (the module to call, "compiled" or "eager").
    """
    backbone.to_inference(model, device, precision)
    transform = backbone.preprocessing(arch, 224)
    features = backbone.trunk(model, poolings)
    module = Normalised(features, backbone.compute_dtype(precision), tuple(transform.mean),
                        tuple(transform.std)).to(device).eval()
    if not compile_graph:
        return module, "eager"
    if cache_dir is not None:
        # Inductor's FX graph cache under the feature cache: a second process skips the compile.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: conv + ReLU fused, layouts chosen once
    return torch.compile(module, dynamic=False), "compiled"


def run_batches(module: nn.Module, dataset: Dataset, order: np.ndarray, batch_size: int, resize: int,
                crop: int, device: torch.device, on_batch=None,
                interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR,
                ) -> tuple[np.ndarray, list[float], list[int], dict]:
    """Every batch through ``module``: the trunk's output, e.g. (N, 512, h, w) float32 (a tuple of them when the module has
    several outputs), per-batch seconds (wall time from one batch's end to the next's, decoding
    included), images per batch, and where the time went: ``decode_s`` (the decoding thread's
    seconds), ``compute_s`` (the forward passes', copies included) and ``wait_s`` (the forward
    pass waiting for a decoded batch)."""
    outputs, seconds, counts = [], [], []
    spent = {"decode_s": 0.0, "compute_s": 0.0, "wait_s": 0.0}
    with torch.inference_mode():
        began = time.perf_counter()
        for pixels, real, decode_s in batches(dataset, order, batch_size, resize, crop, pin=device.type == "cuda",
                                              interpolation=interpolation):
            computing = time.perf_counter()
            spent["wait_s"] += computing - began
            out = module(pixels.to(device, non_blocking=True))  # (B, 512, S/32, S/32), or a tuple
            out = tuple(o[:real].cpu() for o in out) if isinstance(out, tuple) else out[:real].cpu()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            spent["compute_s"] += now - computing
            seconds.append(now - began)
            began = now
            counts.append(real)
            spent["decode_s"] += decode_s
            outputs.append(tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy())
            if on_batch is not None:
                on_batch(real)
    if outputs and isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs)), seconds, counts, spent
    return np.concatenate(outputs), seconds, counts, spent


def overlap(decode_s: float, compute_s: float, total_s: float) -> float:
    """The share of the decoding that ran hidden behind the forward pass: 1.0 when the extraction
    took no longer than its forward passes, 0.0 when decoding and computing took turns."""
    if decode_s <= 0:
        return 1.0
    return float(min(1.0, max(0.0, (decode_s + compute_s - total_s) / decode_s)))


def compile_or_eager(model: nn.Module, arch: str, device: torch.device, precision: str, images: int,
                     image_size: int, cache_dir: Path | None, poolings: tuple[str, ...] = ()) -> tuple[nn.Module, str]:
    """``runner`` compiled when it pays, eager otherwise or when compiling fails (one line says why)."""
    if not should_compile(images * max(1, len(poolings)), image_size):
        return runner(model, arch, device, precision, False, cache_dir, poolings)
    try:
        return runner(model, arch, device, precision, True, cache_dir, poolings)
    except Exception as error:  # no compiler, an unsupported op: eager is correct, only slower
        print(f"note: torch.compile unavailable ({error.__class__.__name__}: {first_line(error, 120)}); "
              "extracting eagerly", file=sys.stderr)
        return runner(model, arch, device, precision, False, cache_dir, poolings)
