"""Bad input: one clear line naming the path or parameter, exit status 2, no traceback.

Most cases call the CLI in-process (click's runner: the same code path, without paying for a new
interpreter each time); the first runs it as a user would, in a new process.
"""
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from scenesweep.services.servers import free_port

from helpers import REPO, assert_clear_error, invoke, run_cli


def svm(data, *extra):
    return invoke("svm", "--data", str(data), "--train_per_class", "10", "--no-progress", *extra)


def test_missing_folder_in_a_new_process(tmp_path):
    result = run_cli("svm", "--data", str(tmp_path / "nowhere"), process=True)
    assert_clear_error(result, str(tmp_path / "nowhere"), "not found")


def test_no_classes(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clear_error(svm(tmp_path / "empty"), "no class folders")


def test_an_empty_class(flat_scenes):
    (flat_scenes / "kitchen").mkdir()
    assert_clear_error(svm(flat_scenes), str(flat_scenes / "kitchen"), "holds no images")


def test_classes_differ_between_train_and_test(split_scenes):
    (split_scenes / "test" / "coast").rename(split_scenes / "test" / "beach")
    assert_clear_error(svm(split_scenes), "classes differ", "beach", "coast")


def test_fewer_images_than_train_per_class(flat_scenes):
    assert_clear_error(invoke("svm", "--data", str(flat_scenes), "--train_per_class", "20"),
                       str(flat_scenes / "coast"), "train_per_class=20")


def test_corrupt_image(flat_scenes):
    broken = flat_scenes / "forest" / "forest_04.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert_clear_error(svm(flat_scenes), str(broken), "not a readable image")


@pytest.mark.parametrize("option, value, fragment", [
    ("--pooling", "median", "pooling='median': expected one of max, avg, lp1, lp2"),
    ("--layer", "fc9", "layer='fc9'"),
    ("--fc_width", "512", "fc_width='512': expected a value >= 1024"),
    ("--C", "0", "C='0': expected a value > 0"),
    ("--val_fraction", "1.5", "val_fraction='1.5'"),
    ("--weights", "/no/such/file.pt", "/no/such/file.pt"),
])
def test_bad_parameters(option, value, fragment):
    assert_clear_error(invoke("svm", option, value), fragment)


# ---------------------------------------------------------------------------------------------
# The bad-input table: every case gets exit 2, one `error:` line naming the culprit, no
# traceback, and leaves no RUNNING or FAILED run behind.
# ---------------------------------------------------------------------------------------------

def huge_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side x side pixels (a decompression bomb) in a few hundred bytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # IHDR starts at byte 8: length (4), b"IHDR" (4), width (4), height (4), ...; CRC after 13 bytes.
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def study_file(tmp_path: Path, scenes: Path, **changes) -> Path:
    body = {"study": "bad", "tunes": "svm", "n_trials": 2, "register": "",
            "fixed": {"data": str(scenes), "train_per_class": 10, "cache_dir": str(tmp_path / "cache")},
            "space": {"C": {"type": "float", "low": 0.01, "high": 10.0}}}
    for key, value in changes.items():
        body[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _one_class(tmp_path, scenes):
    for name in ("forest", "street"):
        shutil.rmtree(scenes / name)
    return ["svm", "--data", str(scenes), "--train_per_class", "10"], {}, [str(scenes), "one class folder"]


def _truncated_jpeg(tmp_path, scenes):
    path = scenes / "forest" / "forest_01.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["svm", "--data", str(scenes), "--train_per_class", "10"], {}, [str(path), "not a readable image"]


def _flipped_jpeg(tmp_path, scenes):
    path = scenes / "coast" / "coast_03.jpg"
    data = bytearray(path.read_bytes())
    data[data.find(b"\xff\xc4") + 6] ^= 0xFF  # a code length of the Huffman table: header intact
    path.write_bytes(bytes(data))
    return ["sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--data", str(scenes), "--train_per_class", "10"], {}, \
        [str(path), "not a readable image"]


def _unreadable_image(tmp_path, scenes):
    # Reading /proc/1/mem at offset 0 fails even for root (nothing is mapped there): an OSError
    # while reading the file, as a PermissionError would be for a user.
    link = scenes / "forest" / "zz_unreadable.jpg"
    link.symlink_to("/proc/1/mem")
    return ["svm", "--data", str(scenes), "--train_per_class", "10"], {}, [str(link), "cannot read this image"]


def _huge_image(tmp_path, scenes):
    path = huge_png(scenes / "street" / "zz_huge.png")
    return ["svm", "--data", str(scenes), "--train_per_class", "10"], {}, [str(path), "too large"]


def _missing_data_sweep(tmp_path, scenes):
    return ["sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--data", str(tmp_path / "missing")], {}, \
        [str(tmp_path / "missing"), "not found"]


def _fixed_missing_data(tmp_path, scenes):
    path = study_file(tmp_path, scenes, fixed={"data": str(tmp_path / "missing")})
    return ["sweep", str(path)], {}, [str(path), str(tmp_path / "missing"), "not found"]


def _step(value):
    def case(tmp_path, scenes):
        path = study_file(tmp_path, scenes, space={"C": {"type": "float", "low": 0.01, "high": 10.0, "step": value}})
        return ["sweep", str(path)], {}, [str(path), f"step={value!r}"]
    return case


def _number(option, value, command="svm"):
    def case(tmp_path, scenes):
        return [command, f"--{option}", value], {}, [f"{option}={value!r}", "expected a finite number"]
    return case


def _cache_dir_is_a_file(tmp_path, scenes):
    (tmp_path / "a_file").write_text("not a folder")
    return ["svm", "--cache_dir", str(tmp_path / "a_file")], {}, [str(tmp_path / "a_file"), "is a file"]


def _cache_dir_not_writable(tmp_path, scenes):
    return ["svm", "--cache_dir", "/proc/scenesweep-cache"], {}, ["/proc/scenesweep-cache", "not a writable folder"]


def _tracking_store_unwritable(tmp_path, scenes):
    return ["svm"], {"MLFLOW_TRACKING_URI": "sqlite:////proc/mlflow.db"}, \
        ["sqlite:////proc/mlflow.db", "cannot create a database in folder /proc"]


def _tracking_uri_two_slashes(tmp_path, scenes):
    return ["svm"], {"MLFLOW_TRACKING_URI": "sqlite:/x.db"}, ["sqlite:/x.db", "four slashes"]


def _tracking_folder_missing(tmp_path, scenes):
    return ["svm"], {"MLFLOW_TRACKING_URI": "sqlite:////nonexistent-scenesweep/dir/x.db"}, \
        ["/nonexistent-scenesweep/dir", "does not exist"]


def _tracking_server_down(tmp_path, scenes):
    uri = f"http://127.0.0.1:{free_port()}"
    return ["svm"], {"MLFLOW_TRACKING_URI": uri}, [uri, "no MLflow tracking server answers"]


def _storage_folder_missing(tmp_path, scenes):
    return ["sweep", str(study_file(tmp_path, scenes)), "--storage", "sqlite:////nonexistent-scenesweep/dir/x.db"], {}, \
        ["/nonexistent-scenesweep/dir", "does not exist"]


def _unknown_pruner_option(tmp_path, scenes):
    path = study_file(tmp_path, scenes, pruner={"name": "median", "n_warmup_epochs": 3})
    return ["sweep", str(path)], {}, [str(path), "pruner.n_warmup_epochs", "not an option of the median pruner"]


def _sampler_seed_text(tmp_path, scenes):
    path = study_file(tmp_path, scenes, sampler={"name": "tpe", "seed": "abc"})
    return ["sweep", str(path)], {}, [str(path), "sampler.seed='abc'", "expected an integer"]


def _weights_missing(command):
    def case(tmp_path, scenes):
        target = str(study_file(tmp_path, scenes)) if command == "sweep" else None
        args = ["sweep", target] if target else ["svm"]
        return [*args, "--weights", str(tmp_path / "missing.pth")], {}, [str(tmp_path / "missing.pth"), "not found"]
    return case


def _weights_text_file(tmp_path, scenes):
    (tmp_path / "weights.pth").write_text("these are not weights")
    return ["svm", "--weights", str(tmp_path / "weights.pth")], {}, \
        [str(tmp_path / "weights.pth"), "not a torch state_dict file"]


def _cuda_without_gpu(tmp_path, scenes):
    return ["svm", "--device", "cuda"], {}, ["device='cuda'", "no CUDA device"]


def _predict_empty_file(tmp_path, scenes):
    (tmp_path / "empty.png").write_bytes(b"")
    return ["predict", str(tmp_path / "empty.png")], {}, [str(tmp_path / "empty.png"), "empty file"]


def _study_file_text(text: str | bytes, name: str = "study.yaml"):
    def case(tmp_path, scenes):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return case


BILLION_LAUGHS = "study: bomb\ntunes: svm\nn_trials: 1\nspace: {C: {type: float, low: 0.1, high: 1}}\n" + \
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + \
    "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
            f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)) + \
    "description: *i\n"


def _study_file_case(make, *fragments):
    def case(tmp_path, scenes):
        path = make(tmp_path, scenes)
        return ["sweep", str(path)], {}, [str(path), *fragments]
    return case


def _folder_as_study_file(tmp_path, scenes):
    (tmp_path / "a_folder").mkdir()
    return tmp_path / "a_folder"


def _features_is_a_file(tmp_path, scenes):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features").write_text("not the cache's folder")
    return ["svm", "--data", str(scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache")], {}, \
        [str(tmp_path / "cache" / "features"), "is a file"]


BAD_INPUT = {
    "one class": _one_class, "truncated JPEG": _truncated_jpeg, "JPEG with a flipped header byte": _flipped_jpeg,
    "unreadable image": _unreadable_image, "20000x20000 PNG": _huge_image,
    "sweep --data /missing": _missing_data_sweep, "fixed: {data: /missing}": _fixed_missing_data,
    "step: -0.5": _step(-0.5), "step: 0": _step(0),
    "--C nan": _number("C", "nan"), "--C inf": _number("C", "inf"),
    "--lr nan": _number("lr", "nan", "finetune"), "--lr inf": _number("lr", "inf", "finetune"),
    "--cache_dir a file": _cache_dir_is_a_file, "--cache_dir not writable": _cache_dir_not_writable,
    "tracking store in an unwritable folder": _tracking_store_unwritable,
    "MLFLOW_TRACKING_URI=sqlite:/x.db": _tracking_uri_two_slashes,
    "tracking store in a folder that does not exist": _tracking_folder_missing,
    "tracking server down": _tracking_server_down, "--storage in a folder that does not exist": _storage_folder_missing,
    "unknown pruner option": _unknown_pruner_option, "sampler seed: abc": _sampler_seed_text,
    "svm --weights /missing.pth": _weights_missing("svm"), "sweep --weights /missing.pth": _weights_missing("sweep"),
    "--weights a text file": _weights_text_file, "--device cuda without a GPU": _cuda_without_gpu,
    "predict an empty file": _predict_empty_file,
    # Study files read with limits, checked before anything is created.
    "a billion-laughs study file": _study_file_case(_study_file_text(BILLION_LAUGHS), "more than 20 aliases"),
    "a 2 MB study file": _study_file_case(_study_file_text("description: " + "x" * 2_000_000 + "\n"),
                                          "larger than 1,000,000 bytes"),
    "a 20001-character description": _study_file_case(
        lambda tmp_path, scenes: study_file(tmp_path, scenes, description="y" * 20_001),
        "description: 20,001 characters", "at most 16,000"),
    "random bytes as a study file": _study_file_case(_study_file_text(bytes(range(128, 256)) * 4), "not UTF-8"),
    "a binary study file": _study_file_case(_study_file_text(b"study: x\n\0\0\0"), "binary"),
    "a folder as study file": _study_file_case(_folder_as_study_file, "is a folder"),
    "/dev/zero as study file": _study_file_case(lambda tmp_path, scenes: Path("/dev/zero"), "not a regular file"),
    "a file where the cache's features/ folder goes": _features_is_a_file,
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_table(case, flat_scenes, tmp_path, monkeypatch, store):
    if case is _cuda_without_gpu and torch.cuda.is_available():
        pytest.skip("a GPU is present: device=cuda is valid here")
    store_uri = os.environ["MLFLOW_TRACKING_URI"]
    args, env, fragments = case(tmp_path, flat_scenes)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = invoke(*args, "--no-progress") if args[0] in ("svm", "finetune", "sweep") else invoke(*args)
    assert_clear_error(result, *fragments)
    left = MlflowClient(tracking_uri=store_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=store_uri).search_experiments()])
    assert not [r.info.run_name for r in left if r.info.status in ("RUNNING", "FAILED")]
    assert not Path("/nonexistent-scenesweep").exists()


@pytest.fixture
def small_disk(tmpfs):
    """A 3 MB tmpfs."""
    return tmpfs("small_disk", 3)


def test_a_full_cache_disk_is_one_line_naming_the_folder_and_leaves_nothing_half_written(flat_scenes, small_disk,
                                                                                       store):
    # pool5 of 42 images is 4.2 MB (512 x 7 x 7 floats each, at any size): more than the disk holds.
    result = svm(flat_scenes, "--image_size", "64", "--layer", "pool5", "--precision", "fp32", "--cache_dir",
                 str(small_disk))
    assert_clear_error(result, str(small_disk / "features"), "is full", "MB free")
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not list(small_disk.rglob("*.tmp"))  # the half-written entry removed
