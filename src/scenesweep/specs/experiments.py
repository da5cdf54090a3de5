"""Experiment files (``experiments/*.yaml``): one experiment of the reference study each.

An experiment file states only what differs from the defaults and names what it runs, one of:
  * ``study: sweeps/NAME.yaml``: an Optuna study (``scenesweep.runs.sweep.run_study``);
  * ``run: svm|finetune|extract``: one tracked run (``scenesweep.runs.single.track_single_run``);
  * ``kind: describe|imagenet|featuremaps``: the parameter table (Q1), ImageNet top classes of
    given images (Q3), or the first-convolution maps of given images (Q4).

Settings, lowest precedence first:
  1. ``REAL_SETTING``: the study's setting (ImageNet weights, 224 px, 100 training images per
     class, mini-batches of 8); the 15-Scene folder comes from ``data:`` or ``--data PATH``.
  2. the file's ``params`` (run parameters) and options (``n_trials``, ``images``, ...).
  3. with ``--demo``: ``DEMO_SETTING`` (the embedded default: digits, random weights, 32 px),
     then the file's ``demo:`` block (small budgets).
  4. what the user gives on the command line.

Every file is validated before anything runs: an unknown key, an unknown run parameter or a bad
value is one ``ConfigError`` naming the file and the key. Runs are tagged ``scenesweep.*`` (the
experiment, its file, the question, demo or real setting, the command) so that the report
(``scenesweep.report``) finds them.

This module reads files (their schema and validation); ``specs.plans`` resolves one for an
invocation and ``runs.experiment`` runs it. It imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any, Callable

from ..compute.data import DIGITS
from ..compute.featuremaps import DEFAULT_THRESHOLD
from ..core.config import ENTRY_HEADS, PARAMETER_BY_NAME, make_config, number, repo_root, run_parameters
from ..core.errors import ConfigError, file_error
from .studies import StudySpec, load_study, read_yaml_mapping

EXPERIMENTS_DIR = "experiments"
KINDS = ("describe", "imagenet", "featuremaps")
# What a file can name to run: the key and its allowed values.
TARGETS = {"study": None, "run": tuple(ENTRY_HEADS), "kind": KINDS}

# The reference study's setting (STUDY.md): the default of every experiment file. Mini-batches
# of 8 as in the study, so that seconds per batch compare with its pooling table.
REAL_SETTING = {"weights": "imagenet", "image_size": 224, "train_per_class": 100, "batch_size": 8}
# The embedded default (--demo): runs offline in minutes; never presented as a 15-Scene figure.
DEMO_SETTING = {"data": DIGITS, "weights": "random", "image_size": 32, "batch_size": 32}
# Placeholder shown in commands that need the user's copy of the dataset.
DATA_PLACEHOLDER = "path/to/15-Scene"

TAG_EXPERIMENT = "scenesweep.experiment"
TAG_FILE = "scenesweep.experiment_file"
TAG_QUESTION = "scenesweep.question"
TAG_SETTING = "scenesweep.setting"  # "demo" or "real"
TAG_COMMAND = "scenesweep.command"
TAG_TEST_PER = "scenesweep.test_per"


_positive_int = number("", int, 1, parse=False)
_positive_number = number("", float, 0, low_open=True, parse=False)
_number = number("", float, parse=False)


def _image_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{value!r}: expected a list of image paths")
    return tuple(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{value!r}: expected text")
    return value


# Options beyond run parameters, per target kind: name -> converter.
OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "study": {"n_trials": _positive_int, "timeout": _positive_number, "test_per": _text},
    "run": {},
    "describe": {},
    "imagenet": {"images": _image_list, "sample_images": _positive_int, "top": _positive_int},
    "featuremaps": {"images": _image_list, "sample_images": _positive_int, "threshold": _number},
}
OPTION_DEFAULTS = {"imagenet": {"sample_images": 3, "top": 5},
                   "featuremaps": {"sample_images": 2, "threshold": DEFAULT_THRESHOLD}}
DESCRIPTIVE_KEYS = {"question", "title", "description", "reference"}
COMMON_KEYS = DESCRIPTIVE_KEYS | {"params", "demo"} | set(TARGETS)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A validated experiment file.

    Attributes:
        path: the file; name: its stem (the tag the report looks runs up by).
        question: the study's question number, e.g. "Q8/Q10"; title, description: what it is.
        target: "study", "run" or one of ``KINDS``; what: the study file (repo-relative),
            the entry point, or the kind.
        head: the head its runs train ("svm", "mlp") or None.
        params: run-parameter values the file sets; options: its other settings (n_trials, ...).
        demo: what ``--demo`` changes beyond ``DEMO_SETTING`` (run parameters and options).
        reference: the study's figures: {"figure": text, "rows": {group value: text}}.
    """

    path: Path
    name: str
    question: str
    title: str
    description: str
    target: str
    what: str
    head: str | None
    params: dict[str, Any]
    options: dict[str, Any]
    demo: dict[str, Any]
    reference: dict[str, Any]

    @property
    def kind(self) -> str:
        """'study', 'run' or the kind: what decides how it runs and how the report shows it."""
        return self.target if self.target in ("study", "run") else self.what

    @property
    def uses_data(self) -> bool:
        """Whether its figures depend on a dataset: describe counts the architecture, and the
        image kinds take images (picked from the dataset only when none are given)."""
        return self.kind in ("study", "run")

    def display_path(self) -> str:
        try:
            return self.path.resolve().relative_to(repo_root()).as_posix()
        except ValueError:
            return str(self.path)

    def command(self, demo: bool = False, data: str | None = None) -> str:
        """The command that runs it: ``scenesweep run FILE --demo`` or ``... --data PATH``."""
        args = ["scenesweep", "run", self.display_path()]
        if demo:
            args.append("--demo")
        elif self.kind != "describe":
            args += ["--data", data or DATA_PLACEHOLDER]
        return " ".join(shlex.quote(a) if a != DATA_PLACEHOLDER else a for a in args)

    def study_spec(self, overrides: dict[str, Any] | None = None) -> StudySpec:
        """The study file it names, with ``overrides`` as fixed settings."""
        return load_study(study_path(self.what), overrides)


def study_path(name: str) -> Path:
    """A study file named in an experiment file: absolute, or relative to the project folder."""
    return Path(name) if Path(name).is_absolute() else repo_root() / name


def check_params(path: Path, where: str, values: dict, head: str | None, space: tuple[str, ...] = ()) -> dict:
    """Each key a run parameter of ``head`` (not one the study searches), each value valid."""
    allowed = run_parameters(head)
    checked = {}
    for name, value in values.items():
        if name not in allowed:
            raise file_error(path, f"{where}{name}: unknown run parameter for head {head or 'none'}; "
                              f"expected some of: {', '.join(allowed)}")
        if name in space:
            raise file_error(path, f"{where}{name}: searched by the study (its space.{name}); it cannot be set here")
        try:
            PARAMETER_BY_NAME[name].convert(value)
        except ConfigError as error:
            raise file_error(path, f"{where}{name}: {error}") from None
        checked[name] = value
    return checked


def check_options(path: Path, where: str, values: dict, kind: str) -> dict:
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = OPTIONS[kind][name](value)
        except ConfigError as error:
            raise file_error(path, f"{where}{name}: {error}") from None
    return checked


def _split_keys(path: Path, where: str, raw: dict, kind: str, head: str | None,
                space: tuple[str, ...]) -> tuple[dict, dict]:
    """A mapping of run parameters and options -> (params, options), each checked."""
    params = {k: v for k, v in raw.items() if k in PARAMETER_BY_NAME}
    options = {k: v for k, v in raw.items() if k in OPTIONS[kind]}
    unknown = sorted(set(raw) - set(params) - set(options))
    if unknown:
        expected = sorted(OPTIONS[kind]) + list(run_parameters(head))
        raise file_error(path, f"{where}{unknown[0]}: unknown key for a {kind} experiment; "
                          f"expected some of: {', '.join(expected)}")
    return check_params(path, where, params, head, space), check_options(path, where, options, kind)


def _target(path: Path, raw: dict) -> tuple[str, str, str, str | None, tuple[str, ...]]:
    """What the file runs: (target key, its value, kind, head, the keys its study searches)."""
    targets = [key for key in TARGETS if key in raw]
    if len(targets) != 1:
        raise file_error(path, f"name exactly one of study:, run:, kind: (found {', '.join(targets) or 'none'})")
    target = targets[0]
    what = raw[target]
    if not isinstance(what, str) or (TARGETS[target] is not None and what not in TARGETS[target]):
        choices = TARGETS[target] or ("a study file such as sweeps/svm_c.yaml",)
        raise file_error(path, f"{target}={what!r}: expected {' or '.join(choices)}")
    kind = target if target in ("study", "run") else what
    if target == "study":
        try:
            spec = load_study(study_path(what))
        except ConfigError as error:
            raise file_error(path, f"study: {error}") from None
        return target, what, kind, spec.tunes, tuple(spec.space)
    return target, what, kind, ENTRY_HEADS[what] if target == "run" else None, ()


def _reference(path: Path, raw: dict) -> dict[str, Any]:
    """The study's figures: {"figure": text, "rows": {group value: text}}."""
    reference = raw.get("reference") or {}
    if not isinstance(reference, dict) or set(reference) - {"figure", "rows"} \
            or not isinstance(reference.get("rows", {}), dict):
        raise file_error(path, "reference: expected a mapping with 'figure' (text) and optional 'rows' "
                               "(group value: text)")
    return {"figure": str(reference.get("figure", "")),
            "rows": {str(k): str(v) for k, v in (reference.get("rows") or {}).items()}}


def _check_resolves(path: Path, target: str, what: str, head: str | None, values: dict[str, Any]) -> None:
    """The file's params (with its demo block) make a valid study or run configuration."""
    try:
        if target == "study":
            load_study(study_path(what), values)
        else:
            make_config(head, values)
    except ConfigError as error:
        raise file_error(path, f"params: {error}") from None


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (nothing runs, no data is read).

    Raises:
        ConfigError: naming the file and the key: not found, not YAML, an unknown key, none or
            several of study/run/kind, an unknown study file, entry point or kind, an unknown
            run parameter, a bad value, a parameter the study searches, a bad ``test_per``.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: experiment file not found (expected one of "
                          f"{', '.join(p.name for p in experiment_files()) or 'experiments/*.yaml'})")
    raw = read_yaml_mapping(path, "experiment settings")
    target, what, kind, head, space = _target(path, raw)
    unknown = sorted(set(raw) - COMMON_KEYS - set(OPTIONS[kind]))
    if unknown:
        raise file_error(path, f"unknown key {unknown[0]!r} for a {kind} experiment; expected some of: "
                          f"{', '.join(sorted(COMMON_KEYS - (set(TARGETS) - {target})) + sorted(OPTIONS[kind]))}")
    params_raw = raw.get("params") or {}
    demo_raw = raw.get("demo") or {}
    for key, value in (("params", params_raw), ("demo", demo_raw)):
        if not isinstance(value, dict):
            raise file_error(path, f"{key}: expected a mapping")
    params = check_params(path, "params.", params_raw, head, space)
    options = check_options(path, "", {k: raw[k] for k in OPTIONS[kind] if k in raw}, kind)
    demo_params, demo_options = _split_keys(path, "demo.", demo_raw, kind, head, space)
    for where, values in (("", options), ("demo.", demo_options)):
        if "test_per" in values and values["test_per"] not in space:
            raise file_error(path, f"{where}test_per={values['test_per']!r}: expected a key the study searches "
                              f"({', '.join(space)})")
    reference = _reference(path, raw)
    _check_resolves(path, target, what, head, {**params, **demo_params})
    return Experiment(path=path, name=path.stem, question=str(raw.get("question", "")),
                      title=str(raw.get("title", path.stem)),
                      description=" ".join(str(raw.get("description", "")).split()),
                      target=target, what=what, head=head, params=params, options=options,
                      demo={**demo_params, **demo_options},
                      reference=reference)


def _natural_key(path: Path) -> list:
    """'q12_1_fc' -> ['q', 12, '_', 1, '_fc']: q1 < q3 < q8 < q12_1, as the study numbers them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def experiment_files(folder: str | Path | None = None) -> list[Path]:
    """The experiment files in the study's order (names start with the question number)."""
    folder = Path(folder) if folder else repo_root() / EXPERIMENTS_DIR
    return sorted(folder.glob("*.yaml"), key=_natural_key) if folder.is_dir() else []


def is_demo_setting(values: dict[str, Any], uses_data: bool = True) -> bool:
    """Random weights, or (for what depends on the data) the digits: a demo figure."""
    weights = str(values.get("weights", PARAMETER_BY_NAME["weights"].default))
    data = str(values.get("data", PARAMETER_BY_NAME["data"].default))
    return weights == "random" or (uses_data and data == DIGITS)
