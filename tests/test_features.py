"""The feature cache: computed once, keyed by content, atomic, self-repairing."""
import json

import numpy as np
import pytest

from scenesweep.compute import feature_cache, features as feat
from scenesweep.core.config import make_config
from scenesweep.compute.data import load_dataset
from scenesweep.compute.training import prepare


def config(cache, **values):
    return make_config("svm", {"cache_dir": str(cache), "train_per_class": 10, "image_size": 32, **values})


def test_first_run_misses_then_hits_and_the_convolutions_are_reused(flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes), layer="relu7")
    first = prepare(cfg, progress=False).features
    assert (first.hit, first.conv_hit) == (False, False)
    assert first.values.shape == (42, 4096)
    assert first.extract_timing["images_per_s"] > 0
    feature_cache.forget_memos()  # a new process: nothing in memory
    second = prepare(cfg, progress=False).features
    assert second.hit and second.key == first.key
    np.testing.assert_array_equal(second.values, first.values)
    # Another layer and C: same conv entry, no new extraction.
    other = prepare(cfg.replace(layer="fc6", C=0.01), progress=False).features
    assert other.conv_key == first.conv_key and other.conv_hit and not other.hit


def test_changing_the_split_or_C_reuses_features(flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes))
    key = prepare(cfg, progress=False).features.key
    again = prepare(cfg.replace(val_fraction=0.3, C=0.5), progress=False).features
    assert again.hit and again.key == key


@pytest.mark.parametrize("change", [
    {"pooling": "avg"}, {"image_size": 48}, {"weights": "random", "seed": 1}, {"layer": "fc7"},
    {"fc_width": 1024}, {"arch": "vgg11"}, {"precision": "bf16"},
])
def test_key_changes_with_each_component(change, flat_scenes, tmp_path):
    dataset = load_dataset(flat_scenes, train_per_class=10)
    base = config(tmp_path, data=str(flat_scenes), precision="fp32")
    changed = base.replace(**change)
    conv_key = feature_cache.cache_key(feature_cache.conv_key_parts(base, dataset, base.precision))
    conv_changed = feature_cache.cache_key(feature_cache.conv_key_parts(changed, dataset, changed.precision))
    key = feature_cache.cache_key(feature_cache.layer_key_parts(base, conv_key))
    key_changed = feature_cache.cache_key(feature_cache.layer_key_parts(changed, conv_changed))
    assert key_changed != key
    conv_only = {"pooling", "image_size", "seed", "arch", "precision"}
    if set(change) & conv_only:
        assert conv_changed != conv_key
    else:
        assert conv_changed == conv_key  # layer / fc width: the convolutions are reused


def test_key_changes_with_the_data(flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes))
    before = prepare(cfg, progress=False).features
    image = flat_scenes / "street" / "street_05.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    after = prepare(cfg, progress=False).features
    assert after.conv_key != before.conv_key and not after.conv_hit


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_array"])
def test_a_damaged_entry_is_detected_and_recomputed(damage, flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes))
    first = prepare(cfg, progress=False).features
    feature_cache.forget_memos()
    array_path, meta_path = feature_cache.FeatureCache(tmp_path / "features").paths(first.key)
    data = array_path.read_bytes()
    if damage == "truncate":
        array_path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        array_path.write_bytes(data[:-8] + bytes(8 * [0x7F]))
    else:
        array_path.unlink()
    again = prepare(cfg, progress=False).features
    assert not again.hit
    np.testing.assert_array_equal(again.values, first.values)
    assert json.loads(meta_path.read_text())["sha256"]


def test_entries_are_written_atomically(flat_scenes, tmp_path):
    prepare(config(tmp_path, data=str(flat_scenes)), progress=False)
    names = [p.name for p in (tmp_path / "features").iterdir()]
    assert names and not [n for n in names if n.endswith(".tmp")]
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["json", "npy"]


def test_timing_stats_leave_out_warm_up_batches():
    stats = feat.batch_timing_stats([10.0, 10.0, 1.0, 1.0, 3.0], [8, 8, 8, 8, 8], warmup=2)
    assert stats["batch_median_s"] == 1.0 and stats["batches"] == 3
    assert stats["images_per_s"] == pytest.approx(24 / 5.0)


def test_a_truncated_conv_sidecar_beside_an_intact_layer_entry_does_no_harm(flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes))
    first = prepare(cfg, progress=False).features
    feature_cache.forget_memos()
    conv_meta = feature_cache.FeatureCache(tmp_path / "features").paths(first.conv_key)[1]
    conv_meta.write_text(conv_meta.read_text()[:20])  # half a JSON file
    again = prepare(cfg, progress=False).features
    assert again.hit and again.extract_timing == first.extract_timing
    np.testing.assert_array_equal(again.values, first.values)


def test_a_deleted_conv_entry_is_reported_absent_not_hit(flat_scenes, tmp_path):
    cfg = config(tmp_path, data=str(flat_scenes))
    first = prepare(cfg, progress=False).features
    feature_cache.forget_memos()
    for path in feature_cache.FeatureCache(tmp_path / "features").paths(first.conv_key):
        path.unlink()
    again = prepare(cfg, progress=False).features
    assert again.hit and again.conv_state == "absent"
    # Another layer needs the convolutions again: they run (a miss), not a phantom hit.
    other = prepare(cfg.replace(layer="fc6"), progress=False).features
    assert other.conv_state == "miss"


def _conv_features(dataset, compile_flag, monkeypatch, tmp_path, batch_size=8):
    # VGG11: the fewest convolutions of a registered network, so the fewest kernels to compile.
    monkeypatch.setenv("SCENESWEEP_COMPILE", compile_flag)
    model = feat.backbone.build_backbone("vgg11", "random", "max", seed=0)
    out, timing = feat.extract_conv(model, dataset, 32, "vgg11", batch_size, feat.torch.device("cpu"), "bf16",
                                    progress=False, cache_dir=tmp_path)
    return out.reshape(len(out), -1), timing


def test_the_compiled_conv_part_matches_eager_bf16(flat_scenes, tmp_path, monkeypatch):
    """torch.compile (inductor, freezing) on the convolutions: the same features as eager bf16
    within its tolerance, the short last batch padded (42 images, batches of 8), and the
    compiled artefact kept in the cache folder for the next process."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    dataset = load_dataset(flat_scenes, train_per_class=10)
    eager, eager_timing = _conv_features(dataset, "0", monkeypatch, tmp_path)
    compiled, timing = _conv_features(dataset, "1", monkeypatch, tmp_path)
    assert eager_timing["compiled"] == 0.0 and timing["compiled"] == 1.0
    assert compiled.shape == eager.shape == (42, 512)
    cosine = np.sum(compiled * eager, axis=1) / (np.linalg.norm(compiled, axis=1) * np.linalg.norm(eager, axis=1))
    assert cosine.min() >= 0.9999, cosine.min()
    assert (tmp_path / "inductor").is_dir() and any((tmp_path / "inductor").iterdir())


def test_batches_of_any_size_give_the_same_features(flat_scenes, tmp_path, monkeypatch):
    dataset = load_dataset(flat_scenes, train_per_class=10)
    by8, timing = _conv_features(dataset, "0", monkeypatch, tmp_path, batch_size=8)
    by5, _ = _conv_features(dataset, "0", monkeypatch, tmp_path, batch_size=5)
    np.testing.assert_allclose(by8, by5, rtol=0.02, atol=1e-3)
    assert timing["decode_s"] > 0 and timing["batches"] >= 1
    # Where the time went: the decoding thread and the forward passes ran at once, so together
    # they may exceed the wall time, never the other way round by more than the loop's own cost.
    assert timing["compute_s"] > 0 and timing["wait_s"] >= 0
    assert timing["compute_s"] + timing["wait_s"] <= timing["total_s"] + 1e-6
    assert 0.0 <= timing["decode_overlap"] <= 1.0


def test_a_pooling_study_extracts_its_poolings_in_one_pass_sharing_the_first_layers(flat_scenes, tmp_path):
    """The pooling types differ only from the first pooling on: one pass fills every pooling's
    conv entry, each equal to what its own pass computes."""
    cfg = config(tmp_path / "shared", data=str(flat_scenes), layer="pool5", precision="fp32")
    first = prepare(cfg, progress=False, share_poolings=("max", "avg", "lp1", "lp2")).features
    assert first.conv_state == "miss" and first.extract_timing["branches"] == 4
    for pooling in ("avg", "lp1", "lp2"):
        shared = prepare(cfg.replace(pooling=pooling), progress=False).features
        assert shared.conv_state == "hit"  # filled by the first pass
        alone = prepare(cfg.replace(pooling=pooling, cache_dir=str(tmp_path / "alone")), progress=False).features
        assert alone.conv_state == "miss" and alone.extract_timing["branches"] == 1
        np.testing.assert_allclose(shared.values, alone.values, rtol=1e-5, atol=1e-6)


def test_killed_writers_temporary_files_are_swept_and_a_folder_in_an_entrys_place_replaced(flat_scenes, tmp_path):
    import os
    import socket
    import subprocess

    cfg = config(tmp_path, data=str(flat_scenes), layer="relu7", precision="fp32")
    first = prepare(cfg, progress=False).features
    folder, host = tmp_path / "features", socket.gethostname().replace(".", "-")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer killed mid-write on this host: its pid is gone
    orphan = folder / f".x.npy.{host}.{dead.pid}.abcd1234.tmp"
    orphan.write_bytes(b"half of an array")
    writing = folder / f".y.npy.{host}.{os.getpid()}.efgh5678.tmp"  # a live writer's: left alone
    writing.write_bytes(b"being written")
    entry = folder / f"{first.key}.npy"
    entry.unlink()
    entry.mkdir()  # a folder where the layer entry should be
    feature_cache.forget_memos()
    again = prepare(cfg, progress=False).features
    assert not again.hit and entry.is_file()
    assert not orphan.exists() and writing.exists()
    np.testing.assert_array_equal(again.values, first.values)


def test_grayscale_images_are_resized_as_one_channel_with_the_same_pixels(flat_scenes):
    """15-Scene is grayscale: resized once and repeated, not resized three times as RGB."""
    import torchvision.transforms.functional as TF

    from scenesweep.compute.data import read_image
    from scenesweep.compute.extractor import load_pixels

    for path in sorted(flat_scenes.rglob("*.*"))[:12]:  # grayscale and colour, JPEG and PNG
        rgb = TF.center_crop(TF.resize(read_image(path), [36], interpolation=TF.InterpolationMode.BILINEAR,
                                       antialias=True), [32, 32])
        np.testing.assert_array_equal(load_pixels(path, 36, 32), np.asarray(rgb, dtype=np.uint8))
