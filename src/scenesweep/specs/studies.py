"""Declarative study files (``sweeps/*.yaml``): loading and validation, before any trial runs.

A study file names what it tunes (a head), fixed settings (any run parameter), a search space
whose keys are run parameters of that head, the objective, sampler, pruner, budget and the
settings to enqueue first. Everything is checked here with the same converters the CLI uses, so
``C: {low: 0}`` fails exactly like ``--C 0``.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import yaml

from ..core.config import (HEADS, PARAMETER_BY_NAME, REGISTERED_MODEL, make_config, number, run_parameters,
                           tuning_parameters)
from ..core.errors import ConfigError, file_error, first_line

STUDY_KEYS = {"study", "experiment", "description", "tunes", "fixed", "space", "objective", "sampler",
              "pruner", "n_trials", "timeout", "enqueue", "register", "tuning"}
SPACE_TYPES = ("float", "int", "categorical")
OBJECTIVE_METRICS = ("val/acc", "val/loss")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One search-space dimension, e.g. C: float in [1e-5, 1e2], log scale."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A validated study file."""

    path: Path
    study: str
    mlflow_experiment: str  # the MLflow experiment its runs go to (the file's ``experiment:``)
    description: str
    tunes: str
    fixed: dict[str, Any]
    space: dict[str, Dimension]
    metric: str
    direction: str
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int | None
    timeout: float | None
    enqueue: tuple[dict[str, Any], ...]
    register: str
    tuning: dict[str, Any] = dataclasses.field(default_factory=dict)

    def trial_config(self, params: dict[str, Any], tuning: bool = False):
        """The full run configuration of a trial: fixed settings plus the trial's params, plus the
        file's ``tuning`` settings for a tuning trial (one that is not the study's own setting)."""
        return make_config(self.tunes, {**self.fixed, **(self.tuning if tuning else {}), **params})



def _dimension(path: Path, head: str, name: str, raw: Any) -> Dimension:
    allowed = run_parameters(head)
    if name not in allowed:
        raise file_error(path, f"space key {name!r} is not a parameter of {head!r}; expected some of: {', '.join(allowed)}")
    if not isinstance(raw, dict) or raw.get("type") not in SPACE_TYPES:
        raise file_error(path, f"space.{name}: expected a mapping with type: one of {', '.join(SPACE_TYPES)}")
    extra = set(raw) - {"type", "low", "high", "log", "step", "choices"}
    if extra:
        raise file_error(path, f"space.{name}: unknown key(s) {', '.join(sorted(extra))}")
    convert = PARAMETER_BY_NAME[name].convert
    try:
        if raw["type"] == "categorical":
            choices = raw.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError("expected a non-empty list 'choices'")
            for choice in choices:
                convert(choice)
            return Dimension(name, "categorical", choices=tuple(choices))
        if "low" not in raw or "high" not in raw:
            raise ConfigError("expected 'low' and 'high'")
        kind = float if raw["type"] == "float" else int
        low, high = convert(raw["low"]), convert(raw["high"])
        low, high = kind(low), kind(high)
        if low >= high:
            raise ConfigError(f"low={low} must be below high={high}")
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise ConfigError("a log scale needs low > 0")
        step = raw.get("step")
        if step is not None:
            if log:
                raise ConfigError("'step' and 'log' cannot be combined")
            number("step", kind, 0, low_open=True, parse=False)(step)
            if step > high - low:
                raise ConfigError(f"step={step!r}: larger than the range {low}..{high}")
        return Dimension(name, raw["type"], low=low, high=high, log=log, step=step)
    except ConfigError as error:
        raise file_error(path, f"space.{name}: {error}") from None


def _option_int(low: int) -> Callable[[Any], int]:
    return number("", int, low, parse=False)


def _option_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{value!r}: expected true or false")
    return value


_option_positive = number("", float, 0, low_open=True, parse=False)


def _option_resource(value: Any) -> Any:
    return value if value == "auto" else _option_int(1)(value)


@dataclasses.dataclass(frozen=True)
class SearchMethod:
    """A sampler or pruner a study file may name: the Optuna class it builds (as
    ``"samplers.TPESampler"``: this layer does not import Optuna) and the options a file may
    give it, each with its check, so that a study file is refused before any trial rather than
    with a TypeError from Optuna's constructor at the first one. Option names are the keyword
    arguments of the Optuna class (tests/test_registries.py checks them against Optuna)."""

    optuna_class: str
    options: dict[str, Callable[[Any], Any]]


# The registry of samplers and pruners: the one place their names and options are declared.
SAMPLERS: dict[str, SearchMethod] = {
    "tpe": SearchMethod("samplers.TPESampler", {
        "seed": _option_int(0), "n_startup_trials": _option_int(0), "n_ei_candidates": _option_int(1),
        "multivariate": _option_bool, "group": _option_bool, "constant_liar": _option_bool,
        "consider_endpoints": _option_bool, "prior_weight": _option_positive}),
    "random": SearchMethod("samplers.RandomSampler", {"seed": _option_int(0)}),
}
PRUNERS: dict[str, SearchMethod] = {
    "none": SearchMethod("pruners.NopPruner", {}),
    "median": SearchMethod("pruners.MedianPruner", {
        "n_startup_trials": _option_int(0), "n_warmup_steps": _option_int(0), "interval_steps": _option_int(1),
        "n_min_trials": _option_int(1)}),
    "successive_halving": SearchMethod("pruners.SuccessiveHalvingPruner", {
        "min_resource": _option_resource, "reduction_factor": _option_int(2),
        "min_early_stopping_rate": _option_int(0), "bootstrap_count": _option_int(0)}),
    "hyperband": SearchMethod("pruners.HyperbandPruner", {
        "min_resource": _option_int(1), "max_resource": _option_resource, "reduction_factor": _option_int(2),
        "bootstrap_count": _option_int(0)}),
}


def _named_options(path: Path, key: str, raw: Any, table: dict[str, SearchMethod], default: str) -> dict[str, Any]:
    """``tpe`` or ``{name: tpe, seed: 0}`` -> {"name": ..., options...}, each option checked."""
    if raw is not None and not isinstance(raw, (str, dict)):
        raise file_error(path, f"{key}: expected a name ({', '.join(table)}) or a mapping with name:")
    raw = {"name": raw} if isinstance(raw, str) else dict(raw or {"name": default})
    raw.setdefault("name", default)
    if raw["name"] not in table:
        raise file_error(path, f"{key}.name={raw['name']!r}: expected one of {', '.join(table)}")
    allowed = table[raw["name"]].options
    for option, value in raw.items():
        if option == "name":
            continue
        if option not in allowed:
            raise file_error(path, f"{key}.{option}: not an option of the {raw['name']} {key}; expected some of: "
                              f"{', '.join(allowed) or 'none'}")
        try:
            allowed[option](value)
        except ConfigError as error:
            raise file_error(path, f"{key}.{option}={value!r}: {error}") from None
    return raw


# What a study or experiment file may be: a small text file (a study file is a page of YAML), with
# few aliases (a "billion laughs" file expands exponentially when anything walks it), and strings
# that MLflow can store: a run's description (``mlflow.note.content``, which adds the study name
# and the command) holds at most 20000 characters, and a tag or param value 5000 / 6000.
MAX_FILE_BYTES = 1_000_000
MAX_ALIASES = 20  # a study file needs none; a "billion laughs" needs 80 or so
MAX_DESCRIPTION_CHARS = 16_000
MAX_TEXT_CHARS = 5_000


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses more than ``MAX_ALIASES`` aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); expected a plain file")
        return super().compose_node(parent, index)


def read_text_file(path: Path, what: str) -> str:
    """A small UTF-8 text file, or one ConfigError naming it: missing, a folder or device or pipe,
    larger than ``MAX_FILE_BYTES``, binary or not UTF-8."""
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: {what} file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML {what} file")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a device, a pipe or a broken link); expected a YAML {what} file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; a {what} file is a page of YAML")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes); expected a YAML {what} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                          f"expected a YAML {what} file") from None


def _check_lengths(path: Path, value: Any, key: str = "") -> None:
    """Every string short enough for MLflow to store (the description longer), else the key."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_lengths(path, item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_lengths(path, item, f"{key}[{index}]")
    elif isinstance(value, str):
        limit = MAX_DESCRIPTION_CHARS if key == "description" else MAX_TEXT_CHARS
        if len(value) > limit:
            raise file_error(path, f"{key}: {len(value):,} characters; expected at most {limit:,} "
                                   "(what MLflow stores in a run's description, tag or param)")


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (study and experiment files), read with limits: see
    ``read_text_file``, ``MAX_ALIASES`` and the string lengths, all checked before anything runs.

    Raises:
        ConfigError: naming the file (and the key), when it is not such a file.
    """
    text = read_text_file(path, what.split()[0])
    try:
        raw = yaml.load(text, Loader=_LimitedLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(raw, dict):
        raise file_error(path, f"expected a mapping of {what}")
    _check_lengths(path, raw)
    return raw


def _fixed(path: Path, raw: dict, overrides: dict[str, Any], head: str, space: dict) -> dict[str, Any]:
    """The file's fixed settings with the command line's on top (never a searched key)."""
    fixed = dict(raw.get("fixed") or {})
    for name, value in overrides.items():
        if name in space:
            raise file_error(path, f"{name} is searched by this study (space.{name}); it cannot also be fixed")
        fixed[name] = value
    clash = set(fixed) & set(space)
    if clash:
        raise file_error(path, f"fixed and space both set {', '.join(sorted(clash))}")
    try:
        make_config(head, fixed)
    except ConfigError as error:
        raise file_error(path, f"fixed: {error}") from None
    return fixed


def _objective(path: Path, raw: dict) -> tuple[str, str]:
    """(metric, direction): a validation metric only, selection never reads the test split."""
    objective = raw.get("objective") or {}
    metric = objective.get("metric", "val/acc")
    if metric not in OBJECTIVE_METRICS:
        raise file_error(path, f"objective.metric={metric!r}: expected one of {', '.join(OBJECTIVE_METRICS)} "
                               "(selection never looks at the test split)")
    direction = objective.get("direction", "maximize" if metric.endswith("acc") else "minimize")
    if direction not in ("maximize", "minimize"):
        raise file_error(path, f"objective.direction={direction!r}: expected maximize or minimize")
    return metric, direction


def _budget(path: Path, raw: dict) -> tuple[int | None, float | None]:
    """(n_trials, timeout): at least one, each positive."""
    n_trials, timeout = raw.get("n_trials"), raw.get("timeout")
    if n_trials is None and timeout is None:
        raise file_error(path, "set n_trials and/or timeout, or the study never ends")
    try:
        if n_trials is not None:
            number("n_trials", int, 1, parse=False)(n_trials)
        if timeout is not None:
            number("timeout", float, 0, low_open=True, parse=False)(timeout)
    except ConfigError as error:
        raise file_error(path, f"{error} (timeout: in seconds)" if timeout is not None else str(error)) from None
    return n_trials, timeout


def _enqueue(path: Path, raw: dict, head: str, fixed: dict, space: dict) -> list[dict[str, Any]]:
    """The settings to run first (the study's own points), each a valid configuration."""
    enqueue = []
    for index, params in enumerate(raw.get("enqueue") or []):
        if not isinstance(params, dict) or set(params) - set(space):
            raise file_error(path, f"enqueue[{index}]: expected a mapping of space keys ({', '.join(space)})")
        try:
            make_config(head, {**fixed, **params})
        except ConfigError as error:
            raise file_error(path, f"enqueue[{index}]: {error}") from None
        enqueue.append(params)
    return enqueue


def _check_choices(path: Path, head: str, fixed: dict, space: dict) -> None:
    """Each choice of a categorical dimension fits the fixed settings (a backbone has the layer,
    the pooling and the image size they name): a study that could only fail is refused here,
    not trial by trial (``--arch resnet50`` on a study searching VGG's layers)."""
    for name, dimension in space.items():
        for choice in dimension.choices if dimension.type == "categorical" else ():
            try:
                make_config(head, {**fixed, name: choice})
            except ConfigError as error:
                raise file_error(path, f"space.{name}: choice {choice!r} with the fixed settings: {error}") from None


def _tuning(path: Path, raw: dict, head: str, fixed: dict, space: dict) -> dict[str, Any]:
    """Settings of the tuning trials (not the enqueued ones): ``tuning: {batch_size: 64}``."""
    tuning = raw.get("tuning") or {}
    if not isinstance(tuning, dict):
        raise file_error(path, "tuning: expected a mapping of run parameters, e.g. {batch_size: 64}")
    for name in tuning:
        if name not in tuning_parameters():
            raise file_error(path, f"tuning.{name}: expected one of {', '.join(tuning_parameters())} (the settings of a "
                                   "search's speed, which the study's own settings do not take)")
        if name in space:
            raise file_error(path, f"tuning.{name}: searched by this study (space.{name})")
    try:
        make_config(head, {**fixed, **tuning})
    except ConfigError as error:
        raise file_error(path, f"tuning: {error}") from None
    return dict(tuning)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and validate a study file; ``overrides`` replace fixed settings (CLI/MLproject).

    Raises:
        ConfigError: naming the file and the key, for an unknown key, an unknown parameter, a
            bad range, an unknown pooling or layer, a bad sampler, pruner or budget.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "study settings")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise file_error(path, f"unknown key(s) {', '.join(sorted(unknown))}; "
                               f"expected some of: {', '.join(sorted(STUDY_KEYS))}")
    for required in ("study", "tunes", "space"):
        if required not in raw:
            raise file_error(path, f"missing key {required!r}")
    head = raw["tunes"]
    if head not in HEADS:
        raise file_error(path, f"tunes={head!r}: expected one of {', '.join(HEADS)}")
    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise file_error(path, "space: expected a mapping of parameter name to dimension")
    space = {name: _dimension(path, head, name, dim) for name, dim in space_raw.items()}

    fixed = _fixed(path, raw, overrides or {}, head, space)
    _check_choices(path, head, fixed, space)
    metric, direction = _objective(path, raw)
    n_trials, timeout = _budget(path, raw)
    enqueue = _enqueue(path, raw, head, fixed, space)
    return StudySpec(path=path, study=str(raw["study"]),
                     mlflow_experiment=str(raw.get("experiment", raw["study"])),
                     description=str(raw.get("description", "")).strip(), tunes=head, fixed=fixed,
                     space=space, metric=metric, direction=direction,
                     sampler=_named_options(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe"),
                     pruner=_named_options(path, "pruner", raw.get("pruner"), PRUNERS, "none"),
                     n_trials=n_trials, timeout=timeout, enqueue=tuple(enqueue),
                     register=str(raw.get("register", REGISTERED_MODEL) or ""),
                     tuning=_tuning(path, raw, head, fixed, space))
