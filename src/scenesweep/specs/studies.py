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
from typing import Any

from ..core.config import (HEADS, PARAMETER_BY_NAME, REGISTERED_MODEL, make_config, number, run_parameters,
                           tuning_parameters)
from ..core.errors import ConfigError, file_error
from .goals import Constraint, Goal, Selection, WarmStart, constraints, folds, goals, select, warm_start
# The registry's names, as the rest of the package imports them from here.
from .search_methods import PRUNERS, SAMPLERS, check_search, grid_size, named_options  # noqa: F401
from .yaml_files import read_yaml_mapping

STUDY_KEYS = {"study", "experiment", "description", "tunes", "fixed", "space", "objective", "objectives",
              "constraints", "select", "warm_start", "validation", "sampler", "pruner", "n_trials", "timeout",
              "enqueue", "register", "tuning"}
SPACE_TYPES = ("float", "int", "categorical")


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
    values: tuple | None = None  # int/float: the grid's points (other samplers search low..high)

    def grid_points(self) -> tuple | None:
        """The finite set of values a grid (or brute force) runs, or None for a continuous range:
        the choices, the ``values:`` list, low..high by ``step``, or every integer of an int range."""
        if self.type == "categorical":
            return self.choices
        if self.values is not None:
            return self.values
        if self.type == "int":
            step = int(self.step or 1)
            return tuple(range(int(self.low), int(self.high) + 1, step))
        if self.step is not None:
            count = int(round((self.high - self.low) / self.step))
            return tuple(round(self.low + i * self.step, 12) for i in range(count + 1)
                         if self.low + i * self.step <= self.high + 1e-12)
        return None


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
    goals: tuple[Goal, ...]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int | None
    timeout: float | None
    enqueue: tuple[dict[str, Any], ...]
    register: str
    tuning: dict[str, Any] = dataclasses.field(default_factory=dict)
    constraints: tuple[Constraint, ...] = ()
    select: Selection | None = None
    warm_start: WarmStart | None = None
    folds: int | None = None  # validation: {folds: K}: stratified K-fold on the training images
    file_fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # the file's fixed: before overrides
    # The fixed settings validated once into a configuration; a trial's is this one with its params.
    base: Any = None

    @property
    def description_as_run(self) -> str:
        """The file's description, and the settings the command line changed (the description
        may say '40 epochs' of a study run with ``--epochs 4``): what a run's page must say."""
        changed = {k: v for k, v in self.fixed.items() if k not in self.file_fixed or self.file_fixed[k] != v}
        if not changed:
            return self.description
        shown = ", ".join(f"{k}={v}" + (f" (the file says {self.file_fixed[k]})" if k in self.file_fixed else "")
                          for k, v in changed.items())
        return f"{self.description}\n\nRun with settings the command line changed: {shown}.".strip()

    @property
    def metric(self) -> str:
        """The first objective's metric (the only one of a single-objective study)."""
        return self.goals[0].metric

    @property
    def direction(self) -> str:
        return self.goals[0].direction

    @property
    def multi_objective(self) -> bool:
        return len(self.goals) > 1

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(goal.metric for goal in self.goals)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(goal.direction for goal in self.goals)

    def needs_metric(self, metric: str) -> bool:
        """Whether any objective, constraint or the selection rule reads ``metric``."""
        return (metric in self.metrics or any(c.metric == metric for c in self.constraints)
                or (self.select is not None and (metric == self.select.metric or metric in self.select.where)))

    def trial_config(self, params: dict[str, Any], tuning: bool = False):
        """The full run configuration of a trial: fixed settings plus the trial's params, plus the
        file's ``tuning`` settings for a tuning trial (one that is not the study's own setting)."""
        if self.base is not None and not params and not (tuning and self.tuning):
            return self.base
        # From the fixed settings as written, not from the base: a value the base derived from
        # another (the layer an architecture reads unless told) must follow a searched arch.
        return make_config(self.tunes, {**self.fixed, **(self.tuning if tuning else {}), **params})



def _dimension(path: Path, head: str, name: str, raw: Any) -> Dimension:
    allowed = run_parameters(head)
    if name not in allowed:
        raise file_error(path, f"space key {name!r} is not a parameter of {head!r}; expected some of: {', '.join(allowed)}")
    if not isinstance(raw, dict) or raw.get("type") not in SPACE_TYPES:
        raise file_error(path, f"space.{name}: expected a mapping with type: one of {', '.join(SPACE_TYPES)}")
    extra = set(raw) - {"type", "low", "high", "log", "step", "choices", "values"}
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
        kind = float if raw["type"] == "float" else int
        values = raw.get("values")
        if values is not None:
            if not isinstance(values, list) or len(values) < 2 or any(isinstance(v, bool) for v in values):
                raise ConfigError("'values' (the grid's points): expected a list of two numbers or more")
            values = tuple(sorted({kind(convert(v)) for v in values}))
            raw = {"low": values[0], "high": values[-1], **raw}
        if "low" not in raw or "high" not in raw:
            raise ConfigError("expected 'low' and 'high' (or a 'values' list)")
        low, high = convert(raw["low"]), convert(raw["high"])
        low, high = kind(low), kind(high)
        if values is not None and (values[0] < low or values[-1] > high):
            raise ConfigError(f"values {list(values)} lie outside low={low}..high={high}")
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
        if step is not None and values is not None:
            raise ConfigError("'step' and 'values' cannot be combined")
        return Dimension(name, raw["type"], low=low, high=high, log=log, step=step, values=values)
    except ConfigError as error:
        raise file_error(path, f"space.{name}: {error}") from None


def _fixed(path: Path, raw: dict, overrides: dict[str, Any], head: str, space: dict) -> tuple[dict[str, Any], Any]:
    """The file's fixed settings with the command line's on top (never a searched key), and
    them validated into the study's base RunConfig."""
    fixed = dict(raw.get("fixed") or {})
    for name, value in overrides.items():
        if name in space:
            raise file_error(path, f"{name} is searched by this study (space.{name}); it cannot also be fixed")
        fixed[name] = value
    clash = set(fixed) & set(space)
    if clash:
        raise file_error(path, f"fixed and space both set {', '.join(sorted(clash))}")
    try:
        base = make_config(head, fixed)
    except ConfigError as error:
        raise file_error(path, f"fixed: {error}") from None
    return fixed, base


def _budget(path: Path, raw: dict, grid: int | None = None) -> tuple[int | None, float | None]:
    """(n_trials, timeout): at least one, each positive; a grid's size when neither is given."""
    n_trials, timeout = raw.get("n_trials"), raw.get("timeout")
    if n_trials is None and timeout is None and grid:
        return grid, None
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

    fixed, base = _fixed(path, raw, overrides or {}, head, space)
    _check_choices(path, head, fixed, space)
    goals_ = goals(path, raw)
    sampler = named_options(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe")
    pruner = named_options(path, "pruner", raw.get("pruner"), PRUNERS, "none")
    folds_ = folds(path, raw, head)
    check_search(path, raw, sampler, pruner, {"space": space, "goals": goals_, "folds": folds_})
    n_trials, timeout = _budget(path, raw, grid_size(space) if SAMPLERS[sampler["name"]].discrete else None)
    enqueue = _enqueue(path, raw, head, fixed, space)
    return StudySpec(path=path, study=str(raw["study"]),
                     mlflow_experiment=str(raw.get("experiment", raw["study"])),
                     description=str(raw.get("description", "")).strip(), tunes=head, fixed=fixed,
                     space=space, goals=goals_, sampler=sampler, pruner=pruner,
                     n_trials=n_trials, timeout=timeout, enqueue=tuple(enqueue),
                     register=str(raw.get("register", REGISTERED_MODEL) or ""),
                     tuning=_tuning(path, raw, head, fixed, space), constraints=constraints(path, raw),
                     select=select(path, raw, goals_), warm_start=warm_start(path, raw), folds=folds_,
                     file_fixed=dict(raw.get("fixed") or {}), base=base)
