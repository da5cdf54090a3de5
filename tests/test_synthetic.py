"""The synthetic 15-Scene stand-in (``scenesweep.synthetic``, ``benchmarks/make_scenes.py``).

Counts and names, image format and sizes, determinism, atomic writing, and that the data loader
reads the folder. Small scales only (2 or 3 images per class): no test here runs a network.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenesweep.compute import synthetic
from scenesweep.compute.data import load_dataset, split_dataset

REPO = Path(__file__).resolve().parents[1]
# 15-Scene's folders and image counts (Lazebnik, Schmid, Ponce 2006), written out here on purpose:
# the module's table is checked against them, not against itself.
REAL_COUNTS = {
    "bedroom": 216, "CALsuburb": 241, "industrial": 311, "kitchen": 210, "livingroom": 289,
    "MITcoast": 360, "MITforest": 328, "MIThighway": 260, "MITinsidecity": 308, "MITmountain": 374,
    "MITopencountry": 410, "MITstreet": 292, "MITtallbuilding": 356, "PARoffice": 215, "store": 315,
}
TINY = 0.001  # every class at min_per_class


def files_of(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every image under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def leftovers(parent: Path, name: str) -> list[Path]:
    """Hidden staging folders of ``name`` left in ``parent`` (there should be none)."""
    return sorted(parent.glob(f".{name}-*"))


def test_class_names_and_counts_are_15_scene():
    assert synthetic.CLASS_COUNTS == REAL_COUNTS
    assert sum(REAL_COUNTS.values()) == synthetic.TOTAL_IMAGES == 4485
    assert synthetic.class_counts(1.0) == REAL_COUNTS
    small = synthetic.class_counts(0.03)
    assert small["MITopencountry"] == round(0.03 * 410) and small["kitchen"] == round(0.03 * 210)
    assert set(synthetic.class_counts(TINY).values()) == {synthetic.MIN_PER_CLASS}
    assert set(synthetic.class_counts(TINY, min_per_class=3).values()) == {3}
    for bad in (0, -1, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="scale"):
            synthetic.class_counts(bad)


def test_writes_flat_folder_of_grayscale_jpegs(tmp_path):
    root = synthetic.write_scenes(tmp_path / "scenes", scale=TINY, seed=0, workers=1, min_per_class=3)
    assert root == (tmp_path / "scenes").absolute()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(REAL_COUNTS)
    sizes = set()
    for name in REAL_COUNTS:
        images = sorted((root / name).iterdir())
        assert [p.name for p in images] == ["image_0001.jpg", "image_0002.jpg", "image_0003.jpg"]
        for path in images:
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "L"
                width, height = image.size
                pixels = np.asarray(image)
            assert synthetic.HEIGHT_RANGE[0] <= height <= synthetic.HEIGHT_RANGE[1]
            assert synthetic.WIDTH_RANGE[0] <= width <= synthetic.WIDTH_RANGE[1]
            assert 20 < pixels.std() < 90 and 60 < pixels.mean() < 200  # textured, neither flat nor clipped
            sizes.add((width, height))
    assert len(sizes) > 20  # sizes vary, as in the real set
    marker = synthetic.read_marker(root)
    assert marker["seed"] == 0 and marker["images"] == 45 and marker["counts"] == synthetic.class_counts(TINY, 3)


def test_same_seed_same_bytes_whatever_the_scale_or_workers(tmp_path):
    first = files_of(synthetic.write_scenes(tmp_path / "a", scale=TINY, seed=7, workers=1))
    again = files_of(synthetic.write_scenes(tmp_path / "b", scale=TINY, seed=7, workers=2))
    assert first == again and len(first) == 30
    other = files_of(synthetic.write_scenes(tmp_path / "c", scale=TINY, seed=8, workers=1))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)
    # The first images of a class are the same in a larger folder.
    larger = files_of(synthetic.write_scenes(tmp_path / "d", scale=TINY, seed=7, workers=1, min_per_class=3))
    assert all(larger[k] == v for k, v in first.items()) and len(larger) == 45


def test_classes_differ_in_texture():
    """A nearest-centroid rule on oriented spectral energy tells classes apart far above chance."""

    def spectral_features(pixels: np.ndarray) -> np.ndarray:
        power = np.abs(np.fft.rfft2(pixels - pixels.mean())) ** 2  # (H, W//2+1)
        fy = np.fft.fftfreq(pixels.shape[0])[:, None]
        fx = np.fft.rfftfreq(pixels.shape[1])[None, :]
        radius, angle = np.hypot(fx, fy), np.mod(np.arctan2(fy, fx), np.pi)
        bins = (np.digitize(radius, [0.02, 0.04, 0.08, 0.16, 0.32]) * 8
                + np.minimum((angle / np.pi * 8).astype(int), 7))
        energy = np.bincount(bins.ravel(), weights=power.ravel(), minlength=48)
        return np.log(energy + 1e-9) - np.log(energy.sum())  # 6 radii x 8 orientations

    per_class = 6
    X, y = [], []
    for label, name in enumerate(synthetic.CLASS_COUNTS):
        for index in range(per_class):
            rng = synthetic.image_rng(0, label, index)
            X.append(spectral_features(synthetic.render_image(synthetic.TEXTURES[name], rng).astype(float)))
            y.append(label)
    X, y = np.asarray(X), np.asarray(y)
    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    correct = 0
    for i in range(len(y)):  # leave one out
        keep = np.arange(len(y)) != i
        centroids = np.stack([X[keep & (y == c)].mean(0) for c in range(15)])
        correct += int(np.argmin(((centroids - X[i]) ** 2).sum(1)) == y[i])
    accuracy = correct / len(y)
    # Chance is 1/15; 0.83 with seed 0. Deterministic, so no flakiness: a drop means the
    # textures changed.
    assert accuracy > 0.5


def test_existing_target_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "scenes"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        synthetic.write_scenes(target, scale=TINY, workers=1)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert leftovers(tmp_path, "scenes") == []
    # An empty folder is taken over.
    empty = tmp_path / "empty"
    empty.mkdir()
    synthetic.write_scenes(empty, scale=TINY, workers=1)
    assert len(files_of(empty)) == 30


def test_exist_ok_accepts_only_the_same_dataset(tmp_path):
    target = synthetic.write_scenes(tmp_path / "scenes", scale=TINY, seed=1, workers=1)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*.jpg")}
    assert synthetic.write_scenes(target, scale=TINY, seed=1, workers=1, exist_ok=True) == target
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*.jpg")} == before  # nothing rewritten
    with pytest.raises(FileExistsError):
        synthetic.write_scenes(target, scale=TINY, seed=2, workers=1, exist_ok=True)
    with pytest.raises(FileExistsError):
        synthetic.write_scenes(target, scale=TINY, seed=1, workers=1)  # without exist_ok
    assert leftovers(tmp_path, "scenes") == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synthetic._write_class_images

    def failing(*task):
        calls.append(task)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real(*task)

    monkeypatch.setattr(synthetic, "_write_class_images", failing)
    with pytest.raises(OSError, match="simulated"):
        synthetic.write_scenes(tmp_path / "scenes", scale=TINY, workers=1)
    assert len(calls) == 5  # it failed after writing some classes
    assert not (tmp_path / "scenes").exists()
    assert leftovers(tmp_path, "scenes") == []


def test_bad_workers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        synthetic.write_scenes(tmp_path / "scenes", scale=TINY, workers=0)
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_reads_it(tmp_path):
    root = synthetic.write_scenes(tmp_path / "scenes", scale=TINY, workers=1, min_per_class=3)
    dataset = load_dataset(root, train_per_class=2, seed=0)
    assert dataset.layout == "flat"
    assert dataset.classes == tuple(sorted(REAL_COUNTS))
    assert len(dataset.paths) == 45 and int(dataset.is_train.sum()) == 30
    assert all(not p.startswith(".") for p in dataset.paths)  # the marker is not an image
    split = split_dataset(dataset, val_fraction=0.5, seed=0)
    assert split.sizes() == {"train": 15, "val": 15, "test": 15}


def test_make_scenes_command(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_scenes", REPO / "benchmarks" / "make_scenes.py")
    make_scenes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_scenes)
    target = tmp_path / "scenes"
    assert make_scenes.main([str(target), "--scale", str(TINY), "--seed", "3", "--workers", "1"]) == 0
    assert "30 grayscale JPEGs in 15 classes, seed 3" in capsys.readouterr().out
    assert make_scenes.main([str(target), "--scale", str(TINY), "--seed", "3", "--exist-ok"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert make_scenes.main([str(target), "--scale", str(TINY)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "already exists" in error and len(error.strip().splitlines()) == 1
    assert make_scenes.main([str(tmp_path / "other"), "--scale", "0"]) == 2
    assert "scale" in capsys.readouterr().err and not (tmp_path / "other").exists()
