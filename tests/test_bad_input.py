"""Bad input: one clear line naming the path or parameter, exit status 2, no traceback.

Most cases call the CLI in-process (click's runner: the same code path, without paying for a new
interpreter each time); the first runs it as a user would, in a new process.
"""
import subprocess

import pytest
from click.testing import CliRunner

from scenesweep.cli import main

from conftest import run_cli


def invoke(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in-process; the result looks like a finished subprocess."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would have escaped: show it
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_clear_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in message[0], (fragment, message[0])


def svm(data, *extra):
    return invoke("svm", "--data", str(data), "--train_per_class", "10", "--no-progress", *extra)


def test_missing_folder_in_a_new_process(tmp_path):
    result = run_cli("svm", "--data", str(tmp_path / "nowhere"))
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
