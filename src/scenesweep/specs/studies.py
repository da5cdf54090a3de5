"""Declarative study files (``sweeps/*.yaml``): loading and validation, before any trial runs.

A study file names what it tunes (a head), fixed settings (any run parameter), a search space
whose keys are run parameters of that head, the objective, sampler, pruner, budget and the
settings to enqueue first. Everything is checked here with the same converters the CLI uses, so
``C: {low: 0}`` fails exactly like ``--C 0``.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from ..core.config import HEADS, PARAMETER_BY_NAME, REGISTERED_MODEL, make_config, run_parameters
from ..core.errors import ConfigError, file_error

STUDY_KEYS = {"study", "experiment", "description", "tunes", "fixed", "space", "objective", "sampler",
              "pruner", "n_trials", "timeout", "enqueue", "register", "tuning"}
# What a study's tuning trials (all but its own enqueued settings) may run differently: settings
# that change how fast a trial runs, not what it measures (a larger batch, another device).
TUNING_KEYS = ("batch_size", "device")
SPACE_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
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
    experiment: str
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
            step_ok = (isinstance(step, int) if kind is int else isinstance(step, (int, float))) \
                and not isinstance(step, bool) and math.isfinite(step) and step > 0
            if not step_ok:
                raise ConfigError(f"step={step!r}: expected a positive {'integer' if kind is int else 'number'}")
            if step > high - low:
                raise ConfigError(f"step={step!r}: larger than the range {low}..{high}")
        return Dimension(name, raw["type"], low=low, high=high, log=log, step=step)
    except ConfigError as error:
        raise file_error(path, f"space.{name}: {error}") from None


def _option_int(low: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{value!r}: expected an integer >= {low}")
        return value

    return convert


def _option_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{value!r}: expected true or false")
    return value


def _option_positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{value!r}: expected a positive number")
    return value


def _option_resource(value: Any) -> Any:
    return value if value == "auto" else _option_int(1)(value)


# The options each sampler and pruner takes, with their checks: a study file is refused before
# any trial (not with a TypeError from Optuna's constructor at the first trial). Names are the
# keyword arguments of Optuna's classes (tests/test_registries.py checks them against Optuna).
SAMPLER_OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "tpe": {"seed": _option_int(0), "n_startup_trials": _option_int(0), "n_ei_candidates": _option_int(1),
            "multivariate": _option_bool, "group": _option_bool, "constant_liar": _option_bool,
            "consider_endpoints": _option_bool, "prior_weight": _option_positive},
    "random": {"seed": _option_int(0)},
}
PRUNER_OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "none": {},
    "median": {"n_startup_trials": _option_int(0), "n_warmup_steps": _option_int(0),
               "interval_steps": _option_int(1), "n_min_trials": _option_int(1)},
    "successive_halving": {"min_resource": _option_resource, "reduction_factor": _option_int(2),
                           "min_early_stopping_rate": _option_int(0), "bootstrap_count": _option_int(0)},
    "hyperband": {"min_resource": _option_int(1), "max_resource": _option_resource,
                  "reduction_factor": _option_int(2), "bootstrap_count": _option_int(0)},
}
assert tuple(SAMPLER_OPTIONS) == SAMPLERS and tuple(PRUNER_OPTIONS) == PRUNERS


def _named_options(path: Path, key: str, raw: Any, table: dict[str, dict[str, Callable[[Any], Any]]],
                   default: str) -> dict[str, Any]:
    """``tpe`` or ``{name: tpe, seed: 0}`` -> {"name": ..., options...}, each option checked."""
    if raw is not None and not isinstance(raw, (str, dict)):
        raise file_error(path, f"{key}: expected a name ({', '.join(table)}) or a mapping with name:")
    raw = {"name": raw} if isinstance(raw, str) else dict(raw or {"name": default})
    raw.setdefault("name", default)
    if raw["name"] not in table:
        raise file_error(path, f"{key}.name={raw['name']!r}: expected one of {', '.join(table)}")
    allowed = table[raw["name"]]
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


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (study and experiment files).

    Raises:
        ConfigError: naming the file, when it is not YAML or not a mapping.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise file_error(path, f"expected a mapping of {what}")
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
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise file_error(path, f"n_trials={n_trials!r}: expected a positive integer")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise file_error(path, f"timeout={timeout!r}: expected a positive number of seconds")
    return n_trials, timeout


def _enqueue(path: Path, raw: dict, head: str, fixed: dict, space: dict) -> list[dict[str, Any]]:
    """The settings to run first (the study's own points), each a valid configuration."""
    enqueue = []
    for number, params in enumerate(raw.get("enqueue") or []):
        if not isinstance(params, dict) or set(params) - set(space):
            raise file_error(path, f"enqueue[{number}]: expected a mapping of space keys ({', '.join(space)})")
        try:
            make_config(head, {**fixed, **params})
        except ConfigError as error:
            raise file_error(path, f"enqueue[{number}]: {error}") from None
        enqueue.append(params)
    return enqueue


def _tuning(path: Path, raw: dict, head: str, fixed: dict, space: dict) -> dict[str, Any]:
    """Settings of the tuning trials (not the enqueued ones): ``tuning: {batch_size: 64}``."""
    tuning = raw.get("tuning") or {}
    if not isinstance(tuning, dict):
        raise file_error(path, "tuning: expected a mapping of run parameters, e.g. {batch_size: 64}")
    for name in tuning:
        if name not in TUNING_KEYS:
            raise file_error(path, f"tuning.{name}: expected one of {', '.join(TUNING_KEYS)} (settings that do "
                                   "not change what a trial measures)")
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
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
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
    metric, direction = _objective(path, raw)
    n_trials, timeout = _budget(path, raw)
    enqueue = _enqueue(path, raw, head, fixed, space)
    return StudySpec(path=path, study=str(raw["study"]), experiment=str(raw.get("experiment", raw["study"])),
                     description=str(raw.get("description", "")).strip(), tunes=head, fixed=fixed,
                     space=space, metric=metric, direction=direction,
                     sampler=_named_options(path, "sampler", raw.get("sampler"), SAMPLER_OPTIONS, "tpe"),
                     pruner=_named_options(path, "pruner", raw.get("pruner"), PRUNER_OPTIONS, "none"),
                     n_trials=n_trials, timeout=timeout, enqueue=tuple(enqueue),
                     register=str(raw.get("register", REGISTERED_MODEL) or ""),
                     tuning=_tuning(path, raw, head, fixed, space))
