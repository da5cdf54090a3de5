"""Datasets: image folders in the 15-Scene layouts, the bundled digits, splits and manifests.

Two layouts are read:
  * ``root/train/<class>/*`` with ``root/test/<class>/*`` (a fixed split);
  * ``root/<class>/*`` (flat, as 15-Scene ships), split into ``train_per_class`` training
    images per class and the rest for test, by a seeded shuffle.
A validation split is then carved from the training images (stratified, seeded); model
selection reads it and never the test images.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import sys
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits

from ..core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
DIGITS = "digits"


class DataError(UserError):
    """A dataset folder or image is not what was expected; the message names the path."""


class ImageTooLargeError(DataError):
    """An image with more pixels than Pillow decodes safely (a decompression bomb).

    Attributes:
        detail: Pillow's words on the size and the limit.
    """

    def __init__(self, where: object, detail: str):
        super().__init__(f"{where}: image too large to decode safely ({detail})")
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image dataset with its train/test split.

    Attributes:
        root: the folder the paths are relative to.
        classes: class names, sorted; a label is an index into it.
        paths: relative image paths, train images first then test, each group sorted.
        labels: (N,) int64 class index of each image.
        is_train: (N,) bool, True for the training pool (train + validation), False for test.
        layout: "train/test" or "flat".
        manifest: one entry per image: relative path, size in bytes, sha256 of the bytes.
    """

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    is_train: np.ndarray
    layout: str
    manifest: tuple[dict, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest (paths, sizes, hashes) and labels: the dataset's identity.

        It depends on the content only, not on the split: features are stored per image, so
        a change of split reuses them.
        """
        body = json.dumps({"classes": self.classes, "images": self.manifest}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def absolute(self, index: int) -> Path:
        return self.root / self.paths[index]


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into a Dataset: train (fit), val (model selection) and test (reported once)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def fingerprint(self) -> str:
        body = ",".join(",".join(map(str, part.tolist())) for part in (self.train, self.val, self.test))
        return hashlib.sha256(body.encode()).hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _entries(folder: Path) -> list[Path]:
    """The entries of a folder, or a DataError naming it when it cannot be listed."""
    try:
        return list(folder.iterdir())
    except OSError as error:  # PermissionError, a file where a folder was expected, ...
        raise DataError(f"{folder}: cannot list this folder ({error.strerror or error.__class__.__name__})") from None


def _is_regular_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a symlink loop (ELOOP), a name the filesystem refuses
        return False


def _list_images(folder: Path, skipped: list[Path]) -> list[Path]:
    """The images of a class folder; entries named like images that are not regular files (a
    FIFO, a device, a broken or looping symlink) go to ``skipped``."""
    named = [p for p in _entries(folder) if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
    skipped.extend(sorted(p for p in named if not _is_regular_file(p)))
    return sorted(p for p in named if _is_regular_file(p))


def display_name(name: str) -> str:
    """A folder name as text anything can show (plots, tags, tables, JSON): bytes that are not
    UTF-8 (kept by Python as surrogates) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _class_folders(folder: Path, skipped: list[Path]) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for each sub-folder of ``folder``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected a folder of class sub-folders")
    classes = sorted(p for p in _entries(folder) if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class>/<images>")
    found = {}
    for class_dir in classes:
        images = _list_images(class_dir, skipped)
        if not images:
            raise DataError(f"{class_dir}: class folder holds no images "
                            f"(expected files ending in {', '.join(IMAGE_SUFFIXES)})")
        found[class_dir.name] = images
    return found


def _file_entry(root: Path, path: Path) -> dict:
    """Manifest entry of one image: relative path, size and sha256 of its bytes."""
    try:
        data = path.read_bytes()
    except OSError as error:  # PermissionError, a file removed meanwhile, ...
        raise DataError(f"{path}: cannot read this image ({error.strerror or error.__class__.__name__})") from None
    return {"path": path.relative_to(root).as_posix(), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def decode_check(path: Path) -> None:
    """Decode the whole image, so that a truncated or corrupt file fails before any run starts.

    (``Image.verify()`` reads the header only: a truncated JPEG passes it and fails later, in
    the middle of an extraction.)

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                image.load()
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(path, str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error.__class__.__name__}: {error})") from None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        # Pillow's own warning would say neither which file nor what happens next.
        print(f"warning: {path}: {size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.0f} megapixels), over the "
              f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} M Pillow decodes without a warning: read anyway (images over "
              f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} M are refused)", file=sys.stderr)


def _check_decodes(root: Path, paths: list[Path], fingerprint: str, cache_dir: str | os.PathLike | None) -> None:
    """Decode every image once per dataset content: the dataset's fingerprint (sha256 of every
    file's bytes) is recorded under ``cache_dir`` once all of them decoded, so later runs on the
    same bytes skip the decoding (4485 JPEGs take seconds) and a changed file is decoded again."""
    marker = Path(cache_dir) / "datasets" / "decoded" / fingerprint if cache_dir else None
    if marker is not None and marker.is_file():
        return
    for path in paths:
        decode_check(path)
    if marker is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the check next time
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{root}\n")


def _split_layout(root: Path, skipped: list[Path]) -> tuple[dict, dict]:
    """<root>/train/<class>/ and <root>/test/<class>/: class -> image paths, for each part."""
    train_dir, test_dir = root / "train", root / "test"
    if not (train_dir.is_dir() and test_dir.is_dir()):
        missing = test_dir if train_dir.is_dir() else train_dir
        raise DataError(f"{missing}: folder not found; a dataset with train/ needs test/ too")
    train, test = _class_folders(train_dir, skipped), _class_folders(test_dir, skipped)
    if sorted(train) != sorted(test):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataError(f"{root}: classes differ between train/ and test/ "
                        f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})")
    return train, test


def _flat_layout(root: Path, skipped: list[Path], train_per_class: int, seed: int) -> tuple[dict, dict]:
    """<root>/<class>/: ``train_per_class`` images of each class drawn (seeded) for training, the
    rest for test, as the study splits 15-Scene."""
    folders = _class_folders(root, skipped)
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for name in sorted(folders):
        images = folders[name]
        if len(images) <= train_per_class:
            raise DataError(f"{root / name}: {len(images)} images, expected more than "
                            f"train_per_class={train_per_class} (the rest is the test set)")
        order = rng.permutation(len(images))
        train[name] = sorted(images[i] for i in order[:train_per_class])
        test[name] = sorted(images[i] for i in order[train_per_class:])
    return train, test


def load_dataset(data: str | os.PathLike, train_per_class: int = 100, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Read an image-folder dataset (or write and read the bundled digits).

    Args:
        data: "digits" or a folder in one of the two 15-Scene layouts.
        train_per_class: training images per class for the flat layout.
        seed: seed of the flat layout's train/test split.
        cache_dir: where "digits" is written as an image folder (once).

    Raises:
        DataError: a missing folder, no classes, an empty class, train/test classes that
            differ, fewer images than ``train_per_class``, or a corrupt image.
    """
    if str(data) == DIGITS:
        root = write_digits(Path(cache_dir or ".") / "datasets" / "digits")
    else:
        root = Path(data).expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"{data}: dataset folder not found; expected 'digits' or a folder laid out as "
                            "<root>/<class>/<images> or <root>/train/<class>/ and <root>/test/<class>/")
    skipped: list[Path] = []
    if (root / "train").is_dir() or (root / "test").is_dir():
        layout, (train, test) = "train/test", _split_layout(root, skipped)
    else:
        layout, (train, test) = "flat", _flat_layout(root, skipped, train_per_class, seed)
    classes = sorted(train)
    if len(classes) < 2:
        raise DataError(f"{root}: one class folder ({classes[0]}); a classifier needs at least 2 class folders")
    paths, labels, is_train = [], [], []
    for flag, group in ((True, train), (False, test)):
        for label, name in enumerate(classes):
            for path in group[name]:
                paths.append(path)
                labels.append(label)
                is_train.append(flag)
    if skipped:
        print(f"warning: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} named like images but not "
              f"regular files (a pipe, a device, a broken or looping link) left out, e.g. {skipped[0]}",
              file=sys.stderr)
    manifest = tuple(_file_entry(root, p) for p in paths)
    shown = [display_name(c) for c in classes]
    if len(set(shown)) < len(shown):  # two names that differ only in undecodable bytes
        shown = [f"{name} ({index})" if shown.count(name) > 1 else name for index, name in enumerate(shown)]
    dataset = Dataset(root=root, classes=tuple(shown), paths=tuple(m["path"] for m in manifest),
                      labels=np.asarray(labels, dtype=np.int64), is_train=np.asarray(is_train),
                      layout=layout, manifest=manifest)
    _check_decodes(root, paths, dataset.fingerprint, cache_dir)
    return dataset


def split_dataset(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Carve a stratified, seeded validation split from the training images.

    Raises:
        DataError: when a class has too few training images to give both train and val one.
    """
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    pool = np.flatnonzero(dataset.is_train)
    for label in range(len(dataset.classes)):
        members = pool[dataset.labels[pool] == label]
        n_val = int(round(len(members) * val_fraction))
        if n_val < 1 or n_val >= len(members):
            raise DataError(f"{dataset.root}: class {dataset.classes[label]!r} has {len(members)} training "
                            f"images, too few for val_fraction={val_fraction} to leave both a train and a "
                            "validation image")
        shuffled = rng.permutation(members)
        val_parts.append(shuffled[:n_val])
        train_parts.append(shuffled[n_val:])
    return Split(train=np.sort(np.concatenate(train_parts)), val=np.sort(np.concatenate(val_parts)),
                 test=np.flatnonzero(~dataset.is_train))


def read_image(path: str | os.PathLike | None = None, data: bytes | None = None,
               keep_gray: bool = False) -> Image.Image:
    """Open an image file (or its bytes) as RGB; grayscale is repeated to 3 channels (or, with
    ``keep_gray``, stays one "L" channel, for a caller that resizes first and repeats after:
    the same pixels for a third of the resizing).

    Raises:
        DataError: naming the file when it cannot be decoded.
    """
    source = io.BytesIO(data) if data is not None else path
    try:
        with warnings.catch_warnings():
            # A large image was named when the dataset was checked (decode_check); decoded quietly here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                if keep_gray and image.mode == "L":
                    return image.copy()
                # "L" -> "RGB" repeats the single channel three times, as the study does.
                return image.convert("RGB")
    except Image.DecompressionBombError as error:
        where = path if path is not None else "image bytes"
        raise ImageTooLargeError(where, str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        where = path if path is not None else "image bytes"
        raise DataError(f"{where}: not a readable image ({error.__class__.__name__}: {error})") from None


def _digits_files(folder: Path) -> dict[str, int]:
    """{relative path: size} of the PNG files of a written digits folder."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.glob("digit_*/*.png") if p.is_file()}


def _digits_intact(target: Path) -> bool:
    """Whether the folder holds exactly the files its ``.complete`` mark lists, at their sizes."""
    try:
        recorded = json.loads((target / ".complete").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _digits_files(target) == recorded


def write_digits(target: Path) -> Path:
    """Write scikit-learn's bundled digits (1797 8x8 images, 10 classes) as PNG class folders.

    Written once, into a temporary folder that is renamed into place, so an interrupted write
    never leaves a half dataset behind. The ``.complete`` mark lists every file with its size:
    a folder that no longer matches it (a PNG deleted or edited by hand) is written again
    instead of silently giving fewer images.
    """
    if _digits_intact(target):
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time: a second process waits, then finds the folder intact.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _digits_intact(target):
            _write_digits(target)
    return target.resolve()


def _write_digits(target: Path) -> None:
    digits = load_digits()
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    try:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            # pixels: (8, 8) in 0..16 -> uint8 grayscale 0..255
            image = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
            folder = staging / f"digit_{label}"
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{index:04d}.png")
        (staging / ".complete").write_text(json.dumps({"source": "scikit-learn load_digits",
                                                       "files": _digits_files(staging)}))
        if target.exists():
            # Damaged: moved aside first, so that the rename below is atomic.
            os.replace(target, staging.parent / f"{staging.name}-damaged")
            shutil.rmtree(staging.parent / f"{staging.name}-damaged", ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
