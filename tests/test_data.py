"""Datasets in both 15-Scene layouts, the bundled digits, splits and manifests."""
import numpy as np
import pytest

from scenesweep.compute.data import DataError, load_dataset, read_image, split_dataset

from helpers import CLASSES


def test_flat_layout_splits_train_per_class_and_rest_for_test(flat_scenes):
    dataset = load_dataset(flat_scenes, train_per_class=10, seed=0)
    assert dataset.layout == "flat"
    assert dataset.classes == CLASSES
    for label in range(3):
        assert np.sum(dataset.is_train & (dataset.labels == label)) == 10
        assert np.sum(~dataset.is_train & (dataset.labels == label)) == 4


def test_flat_split_is_seeded(flat_scenes):
    a = load_dataset(flat_scenes, train_per_class=10, seed=0)
    b = load_dataset(flat_scenes, train_per_class=10, seed=0)
    c = load_dataset(flat_scenes, train_per_class=10, seed=1)
    assert a.paths == b.paths
    assert set(np.array(a.paths)[a.is_train]) != set(np.array(c.paths)[c.is_train])


def test_train_test_layout_keeps_its_split(split_scenes):
    dataset = load_dataset(split_scenes)
    assert dataset.layout == "train/test"
    assert all(p.startswith("train/") for p in np.array(dataset.paths)[dataset.is_train])
    assert all(p.startswith("test/") for p in np.array(dataset.paths)[~dataset.is_train])


def test_validation_is_carved_from_training_images_stratified_and_never_overlaps(flat_scenes):
    dataset = load_dataset(flat_scenes, train_per_class=10)
    split = split_dataset(dataset, val_fraction=0.2, seed=3)
    train, val, test = map(set, (split.train, split.val, split.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == len(dataset.paths)
    assert all(dataset.is_train[i] for i in val) and not any(dataset.is_train[i] for i in test)
    assert np.bincount(dataset.labels[split.val]).tolist() == [2, 2, 2]
    assert split_dataset(dataset, 0.2, seed=3).fingerprint == split.fingerprint
    assert split_dataset(dataset, 0.2, seed=4).fingerprint != split.fingerprint


def test_manifest_fingerprints_content(flat_scenes):
    before = load_dataset(flat_scenes, train_per_class=10)
    assert {"path", "size", "sha256"} <= set(before.manifest[0])
    assert not before.manifest[0]["path"].startswith("/")
    target = flat_scenes / "forest" / "forest_03.jpg"
    target.write_bytes(target.read_bytes() + b"\0")  # same image, different bytes
    after = load_dataset(flat_scenes, train_per_class=10)
    assert after.fingerprint != before.fingerprint


def test_grayscale_and_colour_images_read_as_rgb(flat_scenes):
    for path in (flat_scenes / "coast" / "coast_00.png", flat_scenes / "coast" / "coast_01.jpg"):
        image = read_image(path)
        assert image.mode == "RGB"
    gray = np.asarray(read_image(flat_scenes / "coast" / "coast_01.jpg"))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_digits_are_written_once_as_an_image_folder(tmp_path):
    dataset = load_dataset("digits", train_per_class=100, cache_dir=tmp_path)
    assert len(dataset.paths) == 1797 and len(dataset.classes) == 10
    assert int(dataset.is_train.sum()) == 1000
    stamp = (tmp_path / "datasets" / "digits" / ".complete").stat().st_mtime_ns
    again = load_dataset("digits", cache_dir=tmp_path)
    assert again.fingerprint == dataset.fingerprint
    assert (tmp_path / "datasets" / "digits" / ".complete").stat().st_mtime_ns == stamp


def test_a_damaged_digits_folder_is_written_again(tmp_path):
    load_dataset("digits", cache_dir=tmp_path)
    root = tmp_path / "datasets" / "digits"
    victim = sorted(root.glob("digit_3/*.png"))[0]
    victim.unlink()  # deleted by hand: not silently 1796 images
    stray = root / "digit_4" / "stray.png"
    stray.write_bytes(victim.parent.joinpath(sorted(p.name for p in victim.parent.iterdir())[0]).read_bytes())
    dataset = load_dataset("digits", cache_dir=tmp_path)
    assert len(dataset.paths) == 1797 and victim.is_file() and not stray.exists()


def test_every_image_is_decoded_once_per_content(flat_scenes, tmp_path):
    cache = tmp_path / "cache"
    load_dataset(flat_scenes, train_per_class=10, cache_dir=cache)
    marks = list((cache / "datasets" / "decoded").iterdir())
    assert len(marks) == 1
    # Truncated after the check: the mark belongs to the old content, so it is decoded again.
    image = flat_scenes / "forest" / "forest_01.jpg"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DataError, match="forest_01.jpg: not a readable image"):
        load_dataset(flat_scenes, train_per_class=10, cache_dir=cache)


def test_entries_named_like_images_that_are_not_files_are_reported_in_one_line(flat_scenes, capsys):
    import os

    coast = flat_scenes / "coast"
    os.mkfifo(coast / "a_pipe.jpg")
    (coast / "dangling.png").symlink_to(flat_scenes / "nowhere.png")
    (coast / "loop.png").symlink_to(coast / "loop.png")
    (coast / "zeros.jpg").symlink_to("/dev/zero")
    dataset = load_dataset(flat_scenes, train_per_class=10)
    assert len(dataset.paths) == 42  # the 42 images, none of the four
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "4 entries named like images but not regular files" in warnings[0]
    assert str(coast / "a_pipe.jpg") in warnings[0]


def test_a_class_folder_whose_name_is_not_utf8_is_shown_readably(flat_scenes):
    import io
    import os

    from scenesweep.tracking import plots

    os.rename(flat_scenes / "forest", os.path.join(os.fsencode(flat_scenes), b"for\xeat"))
    dataset = load_dataset(flat_scenes, train_per_class=10)
    assert "for\ufffdt" in dataset.classes and len(dataset.paths) == 42
    assert all(read_image(dataset.absolute(i)) for i in range(len(dataset.paths)))  # the files still open
    figure = plots.confusion_figure(np.eye(3, dtype=int), dataset.classes, "test")
    figure.savefig(io.BytesIO(), format="png")  # matplotlib shows the name


def test_an_image_past_pillows_warning_size_is_named_in_one_warning_line(flat_scenes, capfd):
    """10000x10000 px (100 M pixels, past Pillow's 89 M warning, below its 179 M refusal): one
    `warning:` line naming the file and its size, never Pillow's DecompressionBombWarning text."""
    from PIL import Image

    huge = flat_scenes / "street" / "zz_huge.png"
    Image.new("L", (10_000, 10_000), 128).save(huge)
    dataset = load_dataset(flat_scenes, train_per_class=10)
    assert "street/zz_huge.png" in [str(p) for p in dataset.paths]
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"warning: {huge}: 10000x10000 px (100 megapixels), over the 89 M Pillow decodes without a "
                     "warning: read anyway (images over 179 M are refused)"], err
    read_image(huge, keep_gray=True)  # the extraction reads it quietly: said once, above
    assert capfd.readouterr().err == ""
