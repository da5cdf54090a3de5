"""The MLproject's entry points agree with the parameter table and the CLI: every run parameter
is declared with its default and type, passed on to `bin/entry`, and accepted by the command."""
from __future__ import annotations

import re

import pytest
import yaml
from click.testing import CliRunner

from scenesweep.cli.main import main
from scenesweep.core.config import ENTRY_HEADS, PARAMETER_BY_NAME, run_parameters

from helpers import REPO

ENTRY_POINTS = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
SWEEP_OPTIONS = {"n_trials", "timeout", "storage", "study_name", "n_jobs"}


def passed_options(command: str) -> dict[str, str]:
    """{option: the MLproject parameter it is given} from an entry point's command."""
    return dict(re.findall(r"--(\w+) \{(\w+)\}", command))


@pytest.mark.parametrize("entry", sorted(ENTRY_HEADS), ids=str)
def test_single_run_entry_points_declare_every_parameter_with_its_default(entry):
    declared = ENTRY_POINTS[entry]["parameters"]
    expected = set(run_parameters(ENTRY_HEADS[entry])) | ({"register"} if ENTRY_HEADS[entry] else set())
    assert set(declared) == expected
    for name in run_parameters(ENTRY_HEADS[entry]):
        param = PARAMETER_BY_NAME[name]
        default = param.default  # "": layer and pooling are the backbone's own
        if name == "cache_dir":
            assert declared[name]["default"] == ""
        elif isinstance(default, bool):
            assert str(declared[name]["default"]).lower() == str(default).lower(), name
        elif isinstance(default, (int, float)):
            assert declared[name]["type"] == "float" and float(declared[name]["default"]) == default, name
        else:
            assert str(declared[name]["default"]) == str(default), name
    assert passed_options(ENTRY_POINTS[entry]["command"]) == {name: name for name in expected}


@pytest.mark.parametrize("entry", ["sweep_svm", "sweep_fc", "sweep_pooling", "sweep"], ids=str)
def test_sweep_entry_points_pass_every_parameter_as_an_override(entry):
    declared = ENTRY_POINTS[entry]["parameters"]
    # The shared parameters; a head's own (C, epochs, ...) are the study file's, and `mlflow run`
    # passes an undeclared -P name=value on as --name value, which the command accepts too.
    expected = set(run_parameters(None)) | SWEEP_OPTIONS | ({"file"} if entry == "sweep" else set())
    assert set(declared) == expected
    # Empty means "the study file's value": every override defaults to it.
    assert all(declared[name]["default"] == "" for name in expected - {"file", "n_jobs"})
    passed = passed_options(ENTRY_POINTS[entry]["command"])
    assert passed == {name: name for name in expected - {"file"}}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS), ids=str)
def test_every_option_an_entry_point_passes_is_one_the_command_takes(entry):
    command = ENTRY_POINTS[entry]["command"].split()
    sub = command[2]  # "sh bin/entry <sub> ..."
    result = CliRunner().invoke(main, [sub, "--help"])
    assert result.exit_code == 0, result.output
    for option in passed_options(ENTRY_POINTS[entry]["command"]):
        assert f"--{option}" in result.output, (entry, option)


@pytest.mark.parametrize("command", ["svm", "finetune", "extract", "sweep", "run", "predict"])
def test_every_snake_case_option_has_its_kebab_case_twin(command):
    text = CliRunner().invoke(main, [command, "--help"]).output
    for option in set(re.findall(r"--([a-z]+_[a-z_]+)", text)):
        assert f"--{option.replace('_', '-')}" in text, (command, option)


def test_kebab_case_options_work_like_the_mlproject_spelling(tmp_path):
    """`scenesweep sweep FILE --n-trials 50` as MLflow's and Optuna's users type it."""
    for args in (["--image-size", "0"], ["--image_size", "0"]):
        result = CliRunner().invoke(main, ["svm", *args])
        assert result.exit_code == 2 and "image_size='0'" in result.output, result.output
    result = CliRunner().invoke(main, ["sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--n-trials", "zero"])
    assert result.exit_code == 2 and "--n_trials='zero'" in result.output, result.output
