"""Experiment files (``experiments/*.yaml``): one experiment of the reference study each.

An experiment file states only what differs from the defaults and names what it runs, one of:
  * ``study: sweeps/NAME.yaml``: an Optuna study (``scenesweep.search.run_study``);
  * ``run: svm|finetune|extract``: one tracked run (``scenesweep.tracking.track_single_run``);
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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import (ENTRY_HEADS, PARAMETER_BY_NAME, ConfigError, RunConfig, RunFailedError, make_config,
                     repo_root, run_parameters)
from .data import DIGITS, IMAGE_SUFFIXES, write_digits
from .featuremaps import DEFAULT_THRESHOLD
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


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{value!r}: expected a positive integer")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{value!r}: expected a positive number")
    return float(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{value!r}: expected a number")
    return float(value)


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


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _check_params(path: Path, where: str, values: dict, head: str | None, space: tuple[str, ...] = ()) -> dict:
    """Each key a run parameter of ``head`` (not one the study searches), each value valid."""
    allowed = run_parameters(head)
    checked = {}
    for name, value in values.items():
        if name not in allowed:
            raise _fail(path, f"{where}{name}: unknown run parameter for head {head or 'none'}; "
                              f"expected some of: {', '.join(allowed)}")
        if name in space:
            raise _fail(path, f"{where}{name}: searched by the study (its space.{name}); it cannot be set here")
        try:
            PARAMETER_BY_NAME[name].convert(value)
        except ConfigError as error:
            raise _fail(path, f"{where}{name}: {error}") from None
        checked[name] = value
    return checked


def _check_options(path: Path, where: str, values: dict, kind: str) -> dict:
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = OPTIONS[kind][name](value)
        except ConfigError as error:
            raise _fail(path, f"{where}{name}: {error}") from None
    return checked


def _split_keys(path: Path, where: str, raw: dict, kind: str, head: str | None,
                space: tuple[str, ...]) -> tuple[dict, dict]:
    """A mapping of run parameters and options -> (params, options), each checked."""
    params = {k: v for k, v in raw.items() if k in PARAMETER_BY_NAME}
    options = {k: v for k, v in raw.items() if k in OPTIONS[kind]}
    unknown = sorted(set(raw) - set(params) - set(options))
    if unknown:
        expected = sorted(OPTIONS[kind]) + list(run_parameters(head))
        raise _fail(path, f"{where}{unknown[0]}: unknown key for a {kind} experiment; "
                          f"expected some of: {', '.join(expected)}")
    return _check_params(path, where, params, head, space), _check_options(path, where, options, kind)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (nothing runs, no data is read).

    Raises:
        ConfigError: naming the file and the key: not found, not YAML, an unknown key, none or
            several of study/run/kind, an unknown study file, entry point or kind, an unknown
            run parameter, a bad value, a parameter the study searches, a bad ``test_per``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found (expected one of "
                          f"{', '.join(p.name for p in experiment_files()) or 'experiments/*.yaml'})")
    raw = read_yaml_mapping(path, "experiment settings")
    targets = [key for key in TARGETS if key in raw]
    if len(targets) != 1:
        raise _fail(path, f"name exactly one of study:, run:, kind: (found {', '.join(targets) or 'none'})")
    target = targets[0]
    what = raw[target]
    if not isinstance(what, str) or (TARGETS[target] is not None and what not in TARGETS[target]):
        choices = TARGETS[target] or ("a study file such as sweeps/svm_c.yaml",)
        raise _fail(path, f"{target}={what!r}: expected {' or '.join(choices)}")
    kind = target if target in ("study", "run") else what
    space: tuple[str, ...] = ()
    if target == "study":
        try:
            spec = load_study(study_path(what))
        except ConfigError as error:
            raise _fail(path, f"study: {error}") from None
        head, space = spec.tunes, tuple(spec.space)
    elif target == "run":
        head = ENTRY_HEADS[what]
    else:
        head = None

    unknown = sorted(set(raw) - COMMON_KEYS - set(OPTIONS[kind]))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} for a {kind} experiment; expected some of: "
                          f"{', '.join(sorted(COMMON_KEYS - (set(TARGETS) - {target})) + sorted(OPTIONS[kind]))}")
    params_raw = raw.get("params") or {}
    demo_raw = raw.get("demo") or {}
    for key, value in (("params", params_raw), ("demo", demo_raw)):
        if not isinstance(value, dict):
            raise _fail(path, f"{key}: expected a mapping")
    params = _check_params(path, "params.", params_raw, head, space)
    options = _check_options(path, "", {k: raw[k] for k in OPTIONS[kind] if k in raw}, kind)
    demo_params, demo_options = _split_keys(path, "demo.", demo_raw, kind, head, space)
    for where, values in (("", options), ("demo.", demo_options)):
        if "test_per" in values and values["test_per"] not in space:
            raise _fail(path, f"{where}test_per={values['test_per']!r}: expected a key the study searches "
                              f"({', '.join(space)})")
    reference = raw.get("reference") or {}
    if not isinstance(reference, dict) or set(reference) - {"figure", "rows"} \
            or not isinstance(reference.get("rows", {}), dict):
        raise _fail(path, "reference: expected a mapping with 'figure' (text) and optional 'rows' "
                          "(group value: text)")
    if target == "study":
        try:
            load_study(study_path(what), {**params, **demo_params})
        except ConfigError as error:
            raise _fail(path, f"params: {error}") from None
    else:
        try:
            make_config(head, {**params, **demo_params})
        except ConfigError as error:
            raise _fail(path, f"params: {error}") from None
    return Experiment(path=path, name=path.stem, question=str(raw.get("question", "")),
                      title=str(raw.get("title", path.stem)),
                      description=" ".join(str(raw.get("description", "")).split()),
                      target=target, what=what, head=head, params=params, options=options,
                      demo={**demo_params, **demo_options},
                      reference={"figure": str(reference.get("figure", "")),
                                 "rows": {str(k): str(v) for k, v in (reference.get("rows") or {}).items()}})


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """An experiment resolved for one invocation: what exactly will run.

    Attributes:
        values: run-parameter values given (setting, file, demo block, command line); the rest
            take the parameters' defaults.
        options: the options (n_trials, images, threshold, ...), resolved the same way.
        config: the full run configuration (for a study: its fixed settings).
        spec: the study (study experiments only), with ``values`` as fixed settings.
        study_name: the Optuna study name: the study's name plus its setting, so a demo and a
            15-Scene run never resume each other's study.
        images: absolute image paths (imagenet and featuremaps).
    """

    experiment: Experiment
    demo: bool
    values: dict[str, Any]
    options: dict[str, Any]
    config: RunConfig
    spec: StudySpec | None = None
    study_name: str | None = None
    images: tuple[Path, ...] = ()

    @property
    def setting(self) -> str:
        return "demo" if is_demo_setting(self.values, self.experiment.uses_data) else "real"

    def describe(self) -> str:
        """One line: the setting and the values that make it."""
        shown = {k: self.values[k] for k in ("data", "weights", "image_size", "train_per_class", "batch_size")
                 if k in self.values}
        if not self.experiment.uses_data:
            shown.pop("data", None)
            shown.pop("train_per_class", None)
        label = "DEMO setting (not a 15-Scene figure)" if self.setting == "demo" else "real setting"
        return f"{label}: " + ", ".join(f"{k}={v}" for k, v in shown.items())

    def tags(self) -> dict[str, str]:
        experiment = self.experiment
        return {TAG_EXPERIMENT: experiment.name, TAG_FILE: experiment.display_path(),
                TAG_QUESTION: experiment.question, TAG_SETTING: self.setting,
                TAG_COMMAND: experiment.command(demo=self.demo, data=self.values.get("data"))}


def _setting_slug(values: dict[str, Any]) -> str:
    """'digits-random-32px-1a2b3c' : readable, and distinct for every setting that changes results."""
    data = str(values.get("data", PARAMETER_BY_NAME["data"].default))
    weights = str(values.get("weights", PARAMETER_BY_NAME["weights"].default))
    if data != DIGITS:
        values = {**values, "data": str(Path(data).expanduser().resolve())}
    kept = {k: str(v) for k, v in sorted(values.items()) if k not in ("cache_dir", "device")}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:6]
    data_name = data if data == DIGITS else Path(data).name
    weights_name = weights if weights in ("imagenet", "random") else Path(weights).stem
    image_size = values.get("image_size", PARAMETER_BY_NAME["image_size"].default)
    return f"{data_name}-{weights_name}-{image_size}px-{digest}"


def data_folder(values: dict[str, Any]) -> Path:
    """The dataset folder of these values (the digits are written as a folder first)."""
    config = make_config(None, {k: v for k, v in values.items() if k in run_parameters(None)})
    if str(config.data) == DIGITS:
        return write_digits(config.cache_path / "datasets" / "digits")
    return Path(config.data).expanduser().resolve()


def sample_images(folder: Path, count: int) -> tuple[Path, ...]:
    """The first image of ``count`` classes spread over the class list (test images when the
    dataset has a train/test layout), so the choice is the same on every machine."""
    root = folder / "test" if (folder / "test").is_dir() else folder
    if not root.is_dir():
        raise ConfigError(f"{folder}: dataset folder not found; cannot pick sample images from it")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    picked = []
    for index in sorted(set(np.linspace(0, len(classes) - 1, num=min(count, len(classes))).round().astype(int))):
        images = sorted(p for p in classes[index].iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if images:
            picked.append(images[0])
    if not picked:
        raise ConfigError(f"{folder}: no class folder with images to pick sample images from")
    return tuple(picked)


def resolve_images(experiment: Experiment, given: tuple[str, ...], values: dict[str, Any],
                   sample: int, data_given: bool) -> tuple[Path, ...]:
    """Absolute image paths: each given path as is (absolute), else from the working folder,
    else inside the dataset folder; with none given, ``sample`` images picked from the dataset."""
    if not given:
        if not data_given:
            raise _fail(experiment.path, "images: none given; pass --images PATH (repeatable) or "
                                         f"--data {DATA_PLACEHOLDER} to pick {sample} of its images")
        return sample_images(data_folder(values), sample)
    resolved = []
    for name in given:
        path = Path(name).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path]
        if not path.is_absolute() and data_given:
            candidates.append(data_folder(values) / path)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise _fail(experiment.path, f"images: {name}: image not found (looked in "
                                         f"{', '.join(str(c.parent) for c in candidates)})")
        resolved.append(found.resolve())
    return tuple(resolved)


def plan(experiment: Experiment, demo: bool = False, overrides: dict[str, Any] | None = None,
         options: dict[str, Any] | None = None) -> Plan:
    """Resolve an experiment for one invocation (see the module docstring for the precedence).

    Args:
        experiment: a loaded file.
        demo: use the embedded default (digits, random weights, 32 px) and the file's demo budgets.
        overrides: run parameters from the command line (None or "" values are ignored).
        options: options from the command line, e.g. {"n_trials": 3, "images": ("a.png",)}.

    Raises:
        ConfigError: naming the file and the key, e.g. no data for the real setting.
    """
    path, kind = experiment.path, experiment.kind
    overrides = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
    options = {k: v for k, v in (options or {}).items() if v not in (None, "", ())}
    space: tuple[str, ...] = ()
    if kind == "study":
        space = tuple(experiment.study_spec().space)
    # The study's setting, except what this study searches (it cannot also be fixed).
    values = {k: v for k, v in REAL_SETTING.items() if k not in space}
    values.update(experiment.params)
    demo_params = {k: v for k, v in experiment.demo.items() if k in PARAMETER_BY_NAME}
    if demo:
        values.update({k: v for k, v in DEMO_SETTING.items() if k not in space})
        values.update(demo_params)
    _check_params(path, "--", overrides, experiment.head, space)
    values.update(overrides)

    resolved_options = dict(OPTION_DEFAULTS.get(kind, {}))
    resolved_options.update(experiment.options)
    if demo:
        resolved_options.update({k: v for k, v in experiment.demo.items() if k in OPTIONS[kind]})
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise _fail(path, f"--{unknown[0]}: not an option of a {kind} experiment")
    resolved_options.update(_check_options(path, "--", options, kind))

    data_given = "data" in values
    if not data_given and experiment.uses_data:
        raise _fail(path, f"data: no dataset given for the real setting; pass --data {DATA_PLACEHOLDER} "
                          "(or set data: in the file), or run the demo with --demo")
    try:
        config = make_config(experiment.head, values)
    except ConfigError as error:
        raise _fail(path, str(error)) from None
    spec = study_name = None
    images: tuple[Path, ...] = ()
    if kind == "study":
        spec = experiment.study_spec(values)
        study_name = f"{spec.study}@{_setting_slug(values)}"
    elif kind in ("imagenet", "featuremaps"):
        images = resolve_images(experiment, tuple(resolved_options.pop("images", ())), values,
                                resolved_options.pop("sample_images"), data_given)
    return Plan(experiment, demo, values, resolved_options, config, spec, study_name, images)


# ---------------------------------------------------------------------------------------------
# Running a plan. Tracking and Optuna are imported here, not at module level, so that loading
# and validating files stays quick and free of MLflow.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """What a run of an experiment produced: its main MLflow run and lines to print."""

    run_id: str
    lines: list[str]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def run(plan_: Plan, progress: bool = True, register: bool = False) -> Outcome:
    """Run a resolved experiment; every MLflow run it makes is tagged for the report."""
    from . import tracking

    tracking.setup_tracking()
    runner = {"study": _run_study, "run": _run_single, "describe": _run_describe,
              "imagenet": _run_imagenet, "featuremaps": _run_featuremaps}[plan_.experiment.kind]
    return runner(plan_, progress=progress, register=register)


def _tag(run_id: str, tags: dict[str, str]) -> None:
    from . import tracking

    tracking.log_batch(run_id, tags=tags)


def _run_single(plan_: Plan, progress: bool, register: bool) -> Outcome:
    from .studies import DEFAULT_REGISTERED_MODEL
    from .tracking import track_single_run

    entry_point = plan_.experiment.what
    run_id, result = track_single_run(entry_point, plan_.values, progress=progress,
                                      register=DEFAULT_REGISTERED_MODEL if register else "")
    _tag(run_id, plan_.tags())
    if result is None:
        return Outcome(run_id, [f"run {run_id}: features extracted"])
    m = result.metrics
    line = f"run {run_id}: train/acc={m['train/acc']:.4f} val/acc={m['val/acc']:.4f} test/acc={m['test/acc']:.4f}"
    if result.history:
        best = max(result.history, key=lambda h: h["val/acc"])
        line += f"; best val/acc {best['val/acc']:.4f} at epoch {best['epoch']}"
    return Outcome(run_id, [line], {"metrics": m})


def _run_study(plan_: Plan, progress: bool, register: bool) -> Outcome:
    from .search import run_study, summary_lines

    spec = plan_.spec
    summary = run_study(spec, study_name=plan_.study_name, n_trials=plan_.options.get("n_trials"),
                        timeout=plan_.options.get("timeout"), progress=progress, register=register)
    parent_id = summary["parent_run_id"]
    tags = plan_.tags()
    test_per = plan_.options.get("test_per")
    if test_per:
        tags[TAG_TEST_PER] = test_per
    _tag(parent_id, tags)
    lines = summary_lines(summary, spec)
    if summary.get("error"):
        raise RunFailedError(summary["error"])
    if test_per and summary["summarised"]:
        # The study's best trial was just scored on test (on the parent): not refitted again.
        known = {}
        if summary.get("best_run_id") and "result" in summary:
            known[summary["best_run_id"]] = {k: v for k, v in summary["result"].metrics.items()
                                             if k.startswith("test/")}
        for row in evaluate_best_per_group(spec, plan_.study_name, test_per, progress=progress, known=known):
            lines.append(f"best of {test_per}={row['group']}: trial #{row['trial']} {spec.metric}={row['value']:.4f} "
                         f"test/acc={row['test/acc']:.4f}")
    return Outcome(parent_id, lines, {"summary": {k: v for k, v in summary.items() if k != "result"}})


def evaluate_best_per_group(spec: StudySpec, study_name: str, key: str, storage: str | None = None,
                            progress: bool = True,
                            known: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Test accuracy, once, of the best trial (by the study's objective) of each value of ``key``.

    The study compares settings (pooling types, fc widths, feature layers) by their test
    accuracy; selection still reads only the validation metric: within each group the trial is
    chosen on it, then refitted (features come from the cache) and scored on test, and the
    test metrics are logged on that trial's run with a ``test_evaluated`` tag saying why. A
    trial already evaluated (on its run, or in ``known``: run id -> test metrics) is not
    scored again.

    Returns:
        One dict per group: group, trial, value, run_id, test/acc, test/loss.
    """
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from . import tracking
    from .search import USER_ATTR_RUN_ID, resolve_storage
    from .training import evaluate_test_split, fit_head, prepare

    study = optuna.load_study(study_name=study_name, storage=resolve_storage(storage))
    best: dict[str, optuna.trial.FrozenTrial] = {}
    sign = 1.0 if spec.direction == "maximize" else -1.0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        group = str(trial.params.get(key))
        if group not in best or sign * trial.value > sign * best[group].value:
            best[group] = trial
    client = MlflowClient()
    rows = []
    for group, trial in sorted(best.items(), key=lambda item: item[1].number):
        run_id = trial.user_attrs.get(USER_ATTR_RUN_ID, "")
        logged = client.get_run(run_id).data.metrics if run_id else {}
        if "test/acc" in logged:
            test = {"test/acc": logged["test/acc"], "test/loss": logged.get("test/loss", float("nan"))}
        elif run_id in (known or {}):
            test = known[run_id]
            tracking.log_batch(run_id, metrics=test, tags={
                "test_evaluated": f"best trial of {key}={group} by {spec.metric} (the study's best trial)"})
        else:
            config = spec.trial_config(trial.params)
            result = fit_head(prepare(config, progress=progress), config)
            test, _ = evaluate_test_split(result.prepared, result.head)
            if run_id:
                tracking.log_batch(run_id, metrics={**test, "val/acc_refit": result.metrics["val/acc"]},
                                   tags={"test_evaluated": f"best trial of {key}={group} by {spec.metric}"},
                                   step=len(result.history))
        rows.append({"group": group, "trial": trial.number, "value": trial.value, "run_id": run_id, **test})
    return rows


def _hardware_tags(device: str) -> dict[str, str]:
    from . import tracking
    from .features import resolve_device

    return {f"hardware.{k}": v for k, v in tracking.hardware(str(resolve_device(device))).items()}


def _log_params(run_id: str, plan_: Plan, names: tuple[str, ...]) -> None:
    from . import tracking

    tracking.log_batch(run_id, params={**{n: plan_.config.values[n] for n in names},
                                       **{f"option.{k}": v for k, v in plan_.options.items()}})


def _run_describe(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q1: the layer table and parameter counts, from the architecture alone (no weights)."""
    import mlflow

    from . import tracking
    from .backbone import architecture, format_layer_table, layer_table

    config = plan_.config
    with tracking.start_run("describe", f"{plan_.experiment.name} {config.arch}", tags=plan_.tags(),
                            system_metrics=False) as active:
        run_id = active.info.run_id
        _log_params(run_id, plan_, ("arch", "pooling", "fc_width", "image_size", "weights"))
        rows = layer_table(architecture(config.arch, config.pooling, config.fc_width), config.image_size)
        weights = sum(r.weights for r in rows)
        biases = sum(r.biases for r in rows)
        metrics = {"params/total": weights + biases, "params/weights": weights, "params/biases": biases,
                   "params/conv": sum(r.weights + r.biases for r in rows if r.kind == "Convolution"),
                   "params/fc": sum(r.weights + r.biases for r in rows if r.kind == "Fully connected")}
        tags = {}
        if config.pooling == "max" and config.fc_width == 4096:
            # torchvision's weights enum carries its own count: nothing hand-copied.
            import torchvision

            meta = torchvision.models.get_model_weights(config.arch).IMAGENET1K_V1.meta
            metrics["params/torchvision_num_params"] = meta["num_params"]
            tags["params.matches_torchvision"] = str(meta["num_params"] == weights + biases).lower()
        tracking.log_batch(run_id, metrics=metrics, tags=tags)
        table = format_layer_table(rows)
        mlflow.log_text(f"# {config.arch} at {config.image_size} px, pooling {config.pooling}, "
                        f"fc width {config.fc_width}\n\n{table}\n", "layer_table.md")
        mlflow.log_dict([dataclasses.asdict(r) for r in rows], "layer_table.json")
    lines = [table, f"run {run_id}: {weights + biases:,} parameters ({weights:,} weights + {biases:,} biases)"]
    return Outcome(run_id, lines, {"metrics": metrics})


def _log_images(paths: tuple[Path, ...]) -> list[str]:
    """The input images as artifacts ``images/NN_<class>_<name>``; returns their names."""
    import tempfile

    import mlflow

    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, path in enumerate(paths):
            # Prefixed with the index and the class folder: 15-Scene names repeat across classes.
            name = f"{index:02d}_{path.parent.name}_{path.name}"
            (Path(tmp) / name).write_bytes(path.read_bytes())
            names.append(name)
        mlflow.log_artifacts(tmp, "images")
    return names


def _run_imagenet(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q3: the top ImageNet classes of each image, with the 1000-class head."""
    import mlflow

    from . import tracking
    from .imagenet import top_classes

    config, top = plan_.config, plan_.options["top"]
    with tracking.start_run("imagenet", f"{plan_.experiment.name} top-{top}", tags={
            **plan_.tags(), **_hardware_tags(config.device)},
            system_metrics=False) as active:
        run_id = active.info.run_id
        _log_params(run_id, plan_, ("weights", "arch", "image_size", "seed"))
        names = _log_images(plan_.images)
        began = time.perf_counter()
        predictions = top_classes([str(p) for p in plan_.images], weights=config.weights, arch=config.arch,
                                  image_size=config.image_size, top=top, seed=config.seed)
        seconds = time.perf_counter() - began
        records = [{"image": name, "path": str(path),
                    "top": [{"rank": rank, "index": int(index), "name": label, "probability": float(prob)}
                            for rank, (index, label, prob) in enumerate(ranked, start=1)]}
                   for name, path, ranked in zip(names, plan_.images, predictions)]
        mlflow.log_dict(records, "predictions.json")
        table = format_predictions(records)
        mlflow.log_text(table + "\n", "predictions.md")
        tracking.log_batch(run_id, metrics={"time/predict_s": seconds, "images": len(records),
                                            **{f"top1_probability/{i:02d}": r["top"][0]["probability"]
                                               for i, r in enumerate(records)}})
    return Outcome(run_id, [table, f"run {run_id}: top-{top} ImageNet classes of {len(records)} image(s)"],
                   {"predictions": records})


def format_predictions(records: list[dict]) -> str:
    """Markdown: one row per image and rank."""
    lines = ["| image | rank | class | name | probability |", "|---|---|---|---|---|"]
    for record in records:
        for entry in record["top"]:
            lines.append(f"| {record['image'] if entry['rank'] == 1 else ''} | {entry['rank']} | {entry['index']} | "
                         f"{entry['name']} | {entry['probability']:.4f} |")
    return "\n".join(lines)


def featuremap_figure(image: np.ndarray, maps: np.ndarray, title: str, binary: bool = False):
    """The input image beside its 64 maps in an 8 x 8 grid.

    Args:
        image: (S, S, 3) in [0, 1], what the network saw.
        maps: (64, S, S) activations, or booleans when ``binary``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(8, 12, wspace=0.08, hspace=0.3)
    ax = fig.add_subplot(grid[1:6, 0:4])
    ax.imshow(image)
    ax.set_title("input (resized, cropped)")
    ax.axis("off")
    for index in range(min(64, len(maps))):
        cell = fig.add_subplot(grid[index // 8, 4 + index % 8])
        # Each map on its own scale (raw) so that weak filters stay visible; binary: on/off.
        cell.imshow(maps[index], cmap="gray" if binary else "viridis", vmin=0 if binary else None,
                    vmax=1 if binary else None, interpolation="nearest")
        cell.set_xticks([])
        cell.set_yticks([])
        cell.set_title(str(index), fontsize=6, pad=1)
    fig.suptitle(title)
    return fig


def _run_featuremaps(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q4: the 64 maps after conv1_1 + ReLU, raw and thresholded, for each image."""
    import mlflow

    from . import tracking
    from .featuremaps import first_conv_maps

    config, threshold = plan_.config, plan_.options["threshold"]
    with tracking.start_run("featuremaps", f"{plan_.experiment.name} conv1_1", tags={
            **plan_.tags(), **_hardware_tags(config.device)},
            system_metrics=False) as active:
        run_id = active.info.run_id
        _log_params(run_id, plan_, ("weights", "arch", "image_size", "seed"))
        names = _log_images(plan_.images)
        result = first_conv_maps(plan_.images, weights=config.weights, arch=config.arch,
                                 image_size=config.image_size, threshold=threshold, seed=config.seed,
                                 device=config.device)
        active_fraction = result.active_fraction()  # (N, 64)
        files = []
        for index, name in enumerate(names):
            stem = Path(name).stem
            for suffix, maps, binary, what in (
                    ("maps", result.maps[index], False, "ReLU(conv1_1), 64 maps"),
                    (f"above_{threshold:g}", result.thresholded[index], True, f"maps > {threshold:g}")):
                path = f"featuremaps/{stem}_{suffix}.png"
                tracking.log_figure(featuremap_figure(result.inputs[index], maps, f"{name}: {what}", binary), path)
                files.append(path)
        summary = [{"image": name, "max_activation": float(result.maps[i].max()),
                    "mean_active_fraction": float(active_fraction[i].mean()),
                    "active_fraction_per_map": [round(float(v), 5) for v in active_fraction[i]]}
                   for i, name in enumerate(names)]
        mlflow.log_dict({"threshold": threshold, "shape": list(result.maps.shape), "images": summary},
                        "featuremaps/summary.json")
        tracking.log_batch(run_id, metrics={"featuremaps/mean_active_fraction": float(active_fraction.mean()),
                                            "featuremaps/max_activation": float(result.maps.max())})
    lines = [f"run {run_id}: {len(names)} image(s), maps {tuple(result.maps.shape[1:])} each; "
             f"{100 * active_fraction.mean():.1f} % of map pixels above {threshold:g}",
             *[f"  artifact {f}" for f in files]]
    return Outcome(run_id, lines, {"files": files})
