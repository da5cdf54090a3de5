"""A synthetic stand-in for 15-Scene: the same classes, counts and image format, textures for content.

For anyone without the dataset (and for benchmarks at the study's true scale), ``write_scenes``
writes a folder laid out as 15-Scene ships, ``root/<class>/image_NNNN.jpg``:

  * the 15 class names of 15-Scene (Lazebnik, Schmid, Ponce 2006) with their real per-class
    image counts (``CLASS_COUNTS``, 4485 images in all), or a fraction of them (``scale``);
  * grayscale (mode "L") JPEGs of about 250 x 300 px, the size varying a little per image as
    in the real set;
  * content that is texture only: each class has its own oriented frequency bands, spectral
    slope of a 1/f background ("clutter") and blob statistics, and every image draws its own
    rotation, frequency scale, mixture weights, blob count, illumination gradient, contrast,
    pixel noise and JPEG quality around its class's values. So the task is not trivial, yet
    features of a VGG16 with random weights carry class signal (a linear SVM on them lands well
    above chance); these images are no stand-in for the real task's *accuracies*, only for its
    shapes, sizes and costs.

The output is deterministic given ``seed``: each image draws from its own random generator seeded
by (seed, class index, image index), so the first k images of a class are the same at any
``scale`` and with any number of worker processes. The folder is written into a hidden
temporary sibling (``.<name>-XXXX``) and renamed into place when complete, so an interrupted or
failed write never leaves a half-made dataset at the target; a hidden ``.synthetic.json`` inside
records how it was made (``load_dataset`` ignores hidden files).

All of it is numpy (FFT filtering of white noise) plus Pillow's JPEG encoder; several worker
processes share the images when ``workers > 1``.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

# 15-Scene's classes and image counts, in the dataset's own spelling (folder names).
CLASS_COUNTS: dict[str, int] = {
    "bedroom": 216, "CALsuburb": 241, "industrial": 311, "kitchen": 210, "livingroom": 289,
    "MITcoast": 360, "MITforest": 328, "MIThighway": 260, "MITinsidecity": 308,
    "MITmountain": 374, "MITopencountry": 410, "MITstreet": 292, "MITtallbuilding": 356,
    "PARoffice": 215, "store": 315,
}
TOTAL_IMAGES = 4485
assert sum(CLASS_COUNTS.values()) == TOTAL_IMAGES and len(CLASS_COUNTS) == 15

MARKER = ".synthetic.json"  # hidden: data.load_dataset lists only non-hidden class folders and images
FORMAT_VERSION = 1  # bump when the images change for a given seed
MIN_PER_CLASS = 2
HEIGHT_RANGE = (230, 270)  # px, inclusive; 15-Scene's images are "about 250 x 300"
WIDTH_RANGE = (270, 330)
# Within-class variation (tuned so that random-weight VGG16 features carry signal, not all of it).
ROTATION_JITTER_DEG = 4.0  # standard deviation of each image's rotation
FREQUENCY_JITTER = 0.08  # standard deviation of the log of each image's frequency scale
CLUTTER_SCALE = 0.3  # scales every class's clutter weight (the 1/f background that hides the bands)


@dataclasses.dataclass(frozen=True)
class TextureClass:
    """A class's texture statistics, around which each image draws its own.

    Attributes:
        bands: oriented frequency bands as (orientation in degrees, centre frequency in cycles
            per pixel, relative weight). The orientation is that of the wave vector: 0 gives
            vertical stripes, 90 horizontal ones.
        angular_width: orientation bandwidth of every band, degrees (standard deviation).
        slope: amplitude exponent of the isotropic 1/f^slope background (larger: smoother).
        clutter: weight of that background against the bands (0..1).
        blobs: blob density, blobs per 10,000 px.
        blob_radius: blob standard deviation, px.
    """

    bands: tuple[tuple[float, float, float], ...]
    angular_width: float
    slope: float
    clutter: float
    blobs: float
    blob_radius: float


# One texture family per class, loosely after the scenes (coasts: horizontal and smooth; forests:
# fine vertical; tall buildings: vertical with horizontal floors; ...). Some pairs are close on
# purpose (bedroom / livingroom, kitchen / PARoffice, MITstreet / MITinsidecity), as in the real
# set's confusions.
TEXTURES: dict[str, TextureClass] = {
    "bedroom": TextureClass(((0, 0.030, 1.0), (90, 0.040, 0.8)), 14, 1.6, 0.50, 1.2, 9.0),
    "CALsuburb": TextureClass(((90, 0.060, 1.0), (0, 0.090, 0.6)), 12, 1.2, 0.40, 4.0, 3.0),
    "industrial": TextureClass(((30, 0.120, 0.7), (120, 0.120, 0.7)), 20, 1.0, 0.60, 2.5, 4.0),
    "kitchen": TextureClass(((0, 0.070, 1.0), (90, 0.070, 0.9)), 10, 1.3, 0.45, 1.5, 5.0),
    "livingroom": TextureClass(((0, 0.035, 1.0), (90, 0.030, 1.0)), 16, 1.5, 0.55, 1.6, 7.0),
    "MITcoast": TextureClass(((90, 0.025, 1.0),), 8, 1.9, 0.45, 0.0, 1.0),
    "MITforest": TextureClass(((0, 0.150, 1.0),), 10, 0.9, 0.40, 6.0, 2.0),
    "MIThighway": TextureClass(((60, 0.040, 1.0), (120, 0.040, 1.0)), 8, 1.7, 0.45, 0.3, 6.0),
    "MITinsidecity": TextureClass(((0, 0.100, 1.0), (90, 0.110, 0.5)), 12, 1.1, 0.50, 3.0, 3.0),
    "MITmountain": TextureClass(((45, 0.030, 1.0), (135, 0.030, 0.8)), 18, 1.8, 0.50, 0.5, 10.0),
    "MITopencountry": TextureClass(((90, 0.050, 1.0),), 14, 1.5, 0.55, 1.0, 4.0),
    "MITstreet": TextureClass(((0, 0.090, 1.0), (55, 0.060, 0.6), (125, 0.060, 0.6)), 12, 1.2, 0.50, 2.0, 3.0),
    "MITtallbuilding": TextureClass(((0, 0.080, 1.0), (90, 0.160, 0.5)), 8, 1.2, 0.35, 0.5, 2.0),
    "PARoffice": TextureClass(((0, 0.080, 1.0), (90, 0.060, 0.9)), 12, 1.4, 0.50, 2.5, 6.0),
    "store": TextureClass(((0, 0.180, 0.6), (90, 0.180, 0.6)), 30, 0.8, 0.55, 8.0, 2.0),
}
assert tuple(TEXTURES) == tuple(CLASS_COUNTS)


def class_counts(scale: float = 1.0, min_per_class: int = MIN_PER_CLASS) -> dict[str, int]:
    """Images per class: ``round(scale * real count)``, at least ``min_per_class``.

    Raises:
        ValueError: a scale that is not a positive number, or min_per_class below 1.
    """
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r}: expected a positive number (1 for the real counts, 4485 images)")
    if min_per_class < 1:
        raise ValueError(f"min_per_class={min_per_class!r}: expected at least 1")
    return {name: max(min_per_class, int(round(scale * count))) for name, count in CLASS_COUNTS.items()}


def image_name(index: int) -> str:
    """File name of the ``index``-th image of a class (15-Scene's own style, from 1)."""
    return f"image_{index + 1:04d}.jpg"


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------

def _orientation_gain(angle: np.ndarray, centre_rad: float, width_rad: float) -> np.ndarray:
    """Gaussian gain over orientation, modulo pi (a band and its mirror are the same texture)."""
    diff = np.angle(np.exp(2j * (angle - centre_rad))) / 2.0  # wrapped to (-pi/2, pi/2]
    return np.exp(-0.5 * (diff / width_rad) ** 2)


def _unit_rms(gain: np.ndarray) -> np.ndarray:
    """Scale a spectral gain so that filtered unit white noise has unit variance."""
    return gain / max(float(np.sqrt(np.mean(gain ** 2))), 1e-12)


def _add_blobs(pixels: np.ndarray, texture: TextureClass, rng: np.random.Generator, radius: np.ndarray) -> None:
    """Impulses at random places blurred by a Gaussian, added to ``pixels`` (H, W) in place;
    ``radius``: the rfft2 frequency radii (H, W//2+1). Draws from ``rng`` in a fixed order (the
    images of a seed never change)."""
    height, width = pixels.shape
    blobs = rng.poisson(texture.blobs * rng.uniform(0.5, 1.5) * height * width / 1e4)
    if not blobs:
        return
    impulses = np.zeros((height, width))
    rows = rng.integers(0, height, blobs)
    cols = rng.integers(0, width, blobs)
    # Mostly bright spots (lamps, leaves in light), some dark ones.
    np.add.at(impulses, (rows, cols), rng.choice((1.0, -0.6), blobs, p=(0.75, 0.25)))
    sigma = texture.blob_radius * rng.uniform(0.7, 1.4)
    # Fourier transform of a Gaussian of std sigma px: exp(-2 pi^2 sigma^2 f^2).
    blurred = np.fft.irfft2(np.fft.rfft2(impulses) * np.exp(-2.0 * math.pi ** 2 * sigma ** 2 * radius ** 2),
                            s=(height, width))  # (H, W)
    blurred -= blurred.mean()
    pixels += rng.uniform(0.4, 0.9) * blurred / max(float(blurred.std()), 1e-12)


def render_image(texture: TextureClass, rng: np.random.Generator) -> np.ndarray:
    """One grayscale image of a class: (H, W) uint8, H and W drawn from HEIGHT_RANGE / WIDTH_RANGE.

    The image is the inverse real FFT of a sum of spectra: complex white noise shaped by the
    class's oriented bands, white noise shaped by a 1/f^slope background, and impulses at random
    places blurred by a Gaussian (blobs); then an illumination gradient, contrast and brightness,
    pixel noise. Every class parameter is jittered per image.
    """
    height = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    # Frequency grid of rfft2 on (H, W): fy (H, 1) in cycles/px, fx (1, W//2+1).
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)  # (H, W//2+1)
    radius[0, 0] = 1.0 / max(height, width)  # no division by zero at DC (DC is zeroed below)
    angle = np.arctan2(fy, fx)  # (H, W//2+1), radians

    rotation = rng.normal(0.0, ROTATION_JITTER_DEG)  # degrees: the whole image's orientations turn together
    freq_scale = math.exp(rng.normal(0.0, FREQUENCY_JITTER))  # a change of viewing distance
    log_radius = np.log2(radius)

    band_gain = np.zeros_like(radius)
    for orientation, centre, weight in texture.bands:
        weight *= rng.uniform(0.6, 1.4)
        centre_f = centre * freq_scale * math.exp(rng.normal(0.0, 0.08))
        # Radial gain: Gaussian in log-frequency, half an octave wide.
        radial = np.exp(-0.5 * ((log_radius - math.log2(centre_f)) / 0.5) ** 2)
        width_rad = math.radians(texture.angular_width * rng.uniform(0.8, 1.25))
        band_gain += weight * radial * _orientation_gain(angle, math.radians(orientation + rotation), width_rad)
    slope = texture.slope + rng.normal(0.0, 0.15)
    clutter_gain = radius ** (-slope)

    shape = radius.shape
    spectrum = np.zeros(shape, dtype=np.complex128)
    clutter = float(np.clip(CLUTTER_SCALE * texture.clutter + rng.normal(0.0, 0.08), 0.05, 0.9))
    for gain, amount in ((band_gain, math.sqrt(1.0 - clutter)), (clutter_gain, math.sqrt(clutter))):
        noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        spectrum += amount * _unit_rms(gain) * noise

    spectrum[0, 0] = 0.0  # zero mean; brightness is set below
    pixels = np.fft.irfft2(spectrum, s=(height, width))  # (H, W) float64
    pixels /= max(float(pixels.std()), 1e-12)

    _add_blobs(pixels, texture, rng, radius)
    # Illumination: a plane across the image (light from one side), then contrast and brightness.
    y = np.linspace(-1.0, 1.0, height)[:, None]
    x = np.linspace(-1.0, 1.0, width)[None, :]
    pixels += rng.normal(0.0, 0.35) * y + rng.normal(0.0, 0.35) * x
    pixels = 128.0 + rng.normal(0.0, 15.0) + rng.uniform(28.0, 50.0) * pixels
    pixels += rng.normal(0.0, rng.uniform(2.0, 8.0), size=pixels.shape)  # sensor noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The generator of one image: independent of scale, worker count and order of writing."""
    return np.random.default_rng([int(seed), FORMAT_VERSION, int(class_index), int(image_index)])


def _write_class_images(folder: str, class_name: str, class_index: int, start: int, stop: int,
                        seed: int) -> int:
    """Write images ``start..stop-1`` of one class into ``folder``; returns how many (a worker's task)."""
    texture = TEXTURES[class_name]
    target = Path(folder)
    for index in range(start, stop):
        rng = image_rng(seed, class_index, index)
        pixels = render_image(texture, rng)
        quality = int(rng.integers(75, 96))  # the real set's JPEGs vary in quality too
        Image.fromarray(pixels, mode="L").save(target / image_name(index), format="JPEG", quality=quality)
    return stop - start


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------

def _spec(scale: float, seed: int, min_per_class: int) -> dict:
    """What identifies a generated folder (recorded in its marker)."""
    return {"generator": "scenesweep.synthetic", "format": FORMAT_VERSION, "seed": int(seed),
            "scale": float(scale), "min_per_class": int(min_per_class),
            "counts": class_counts(scale, min_per_class)}


def read_marker(root: str | os.PathLike) -> dict | None:
    """The record of a folder written by ``write_scenes`` (None for any other folder)."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _same_dataset(root: Path, spec: dict) -> bool:
    """Whether ``root`` is a complete folder written by ``write_scenes`` with this spec."""
    marker = read_marker(root)
    return marker is not None and all(marker.get(key) == value for key, value in spec.items())


def default_workers() -> int:
    """Cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _write_images(staging: Path, spec: dict, seed: int, workers: int) -> int:
    """Every image of ``spec`` into ``staging/<class>/``, in ``workers`` processes; returns the count."""
    # Tasks of at most 64 images, so that two workers share even a small folder evenly.
    tasks = []
    for class_index, (name, count) in enumerate(spec["counts"].items()):
        (staging / name).mkdir()
        for start in range(0, count, 64):
            tasks.append((str(staging / name), name, class_index, start, min(count, start + 64), seed))
    if workers == 1:
        return sum(_write_class_images(*task) for task in tasks)
    # spawn, not fork: the caller may hold threads (torch, MLflow) that fork would copy mid-lock.
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
        return sum(pool.map(_write_class_images, *zip(*tasks)))


def write_scenes(target: str | os.PathLike, scale: float = 1.0, seed: int = 0, workers: int | None = None,
                 min_per_class: int = MIN_PER_CLASS, exist_ok: bool = False) -> Path:
    """Write a 15-Scene-shaped folder of synthetic texture images at ``target``.

    Args:
        target: the folder to create, ``target/<class>/image_NNNN.jpg``. It must not exist
            (an empty folder is accepted and replaced).
        scale: fraction of each class's real count (1.0: 4485 images).
        seed: the images are a function of it (and of ``FORMAT_VERSION``).
        workers: processes writing images (default: the cores available); 1 writes in this
            process. The images do not depend on it.
        min_per_class: images per class at the least, whatever ``scale``.
        exist_ok: when ``target`` already holds a folder written by this function with the
            same scale, seed and counts, return it instead of failing.

    Returns:
        The absolute path of the folder.

    Raises:
        FileExistsError: ``target`` exists (and is not an identical generated folder with
            ``exist_ok``). Nothing is written then.
        ValueError: a bad ``scale``, ``min_per_class`` or ``workers``.
    """
    target = Path(target).expanduser().absolute()
    spec = _spec(scale, seed, min_per_class)
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected a positive integer")

    def check_target() -> None:
        if not target.exists():
            return
        if exist_ok and _same_dataset(target, spec):
            return
        if target.is_dir() and not any(target.iterdir()):
            return  # an empty folder is replaced by the rename
        raise FileExistsError(f"{target}: already exists; expected a new folder name "
                              "(nothing was written)" + (" (it is not the same generated dataset)" if exist_ok else ""))

    check_target()
    if exist_ok and _same_dataset(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        began = time.perf_counter()
        written = _write_images(staging, spec, seed, workers)
        seconds = time.perf_counter() - began
        (staging / MARKER).write_text(json.dumps({**spec, "images": written, "write_s": round(seconds, 2),
                                                  "workers": workers}, indent=1) + "\n")
        if exist_ok and _same_dataset(target, spec):
            return target  # another process wrote the same dataset meanwhile: keep its copy
        check_target()  # another process may have created something else there meanwhile
        if target.is_dir():
            target.rmdir()  # empty (checked above): rename() onto it would work on Linux, not elsewhere
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
