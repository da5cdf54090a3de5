"""An experiment resolved for one invocation (``Plan``): the setting, the options, the study
name, the images. Precedence, lowest first: the study's setting, the file's ``params`` and
options, the demo setting and the file's ``demo:`` block (``--demo``), the command line.

It imports neither MLflow, Optuna nor click: ``scenesweep run --check`` prints a plan without
touching a store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..compute.data import DIGITS, IMAGE_SUFFIXES, write_digits
from ..core.config import PARAMETER_BY_NAME, RunConfig, make_config, run_parameters
from ..core.errors import ConfigError, file_error
from .experiments import (DATA_PLACEHOLDER, DEMO_SETTING, OPTION_DEFAULTS, OPTIONS, REAL_SETTING, TAG_COMMAND,
                          TAG_EXPERIMENT, TAG_FILE, TAG_QUESTION, TAG_SETTING, Experiment, check_options,
                          check_params, is_demo_setting)
from .studies import StudySpec


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


def _setting_slug(values: dict[str, Any], head: str | None) -> str:
    """'digits-random-32px-1a2b3c' : readable, and distinct for every setting that changes results
    of ``head`` (the parameter table says which)."""
    data = str(values.get("data", PARAMETER_BY_NAME["data"].default))
    weights = str(values.get("weights", PARAMETER_BY_NAME["weights"].default))
    if data != DIGITS:
        values = {**values, "data": str(Path(data).expanduser().resolve())}
    kept = {k: str(v) for k, v in sorted(values.items())
            if k not in PARAMETER_BY_NAME or PARAMETER_BY_NAME[k].changes_result_of(head)}
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
            raise file_error(experiment.path, "images: none given; pass --images PATH (repeatable) or "
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
            raise file_error(experiment.path, f"images: {name}: image not found (looked in "
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
    check_params(path, "--", overrides, experiment.head, space)
    values.update(overrides)

    resolved_options = dict(OPTION_DEFAULTS.get(kind, {}))
    resolved_options.update(experiment.options)
    if demo:
        resolved_options.update({k: v for k, v in experiment.demo.items() if k in OPTIONS[kind]})
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise file_error(path, f"--{unknown[0]}: not an option of a {kind} experiment")
    resolved_options.update(check_options(path, "--", options, kind))

    data_given = "data" in values
    if not data_given and experiment.uses_data:
        raise file_error(path, f"data: no dataset given for the real setting; pass --data {DATA_PLACEHOLDER} "
                          "(or set data: in the file), or run the demo with --demo")
    try:
        config = make_config(experiment.head, values)
    except ConfigError as error:
        raise file_error(path, str(error)) from None
    spec = study_name = None
    images: tuple[Path, ...] = ()
    if kind == "study":
        spec = experiment.study_spec(values)
        study_name = f"{spec.study}@{_setting_slug(values, experiment.head)}"
    elif kind in ("imagenet", "featuremaps"):
        images = resolve_images(experiment, tuple(resolved_options.pop("images", ())), values,
                                resolved_options.pop("sample_images"), data_given)
    return Plan(experiment, demo, values, resolved_options, config, spec, study_name, images)
