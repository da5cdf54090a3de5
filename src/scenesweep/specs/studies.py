"""Declarative study files (``sweeps/*.yaml``): loading and validation, before any trial runs.

A study file names what it tunes (a head), fixed settings (any run parameter), a search space
whose keys are run parameters of that head, the objective, sampler, pruner, budget and the
settings to enqueue first. Everything is checked here with the same converters the CLI uses, so
``C: {low: 0}`` fails exactly like ``--C 0``.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ..core.config import (HEADS, PARAMETER_BY_NAME, REGISTERED_MODEL, make_config, number, run_parameters,
                           tuning_parameters)
from ..core.errors import ConfigError, file_error, first_line

STUDY_KEYS = {"study", "experiment", "description", "tunes", "fixed", "space", "objective", "objectives",
              "constraints", "select", "warm_start", "validation", "sampler", "pruner", "n_trials", "timeout",
              "enqueue", "register", "tuning"}
SPACE_TYPES = ("float", "int", "categorical")
# What a trial is judged on: its validation results (selection never reads the test split) and
# what its model costs to serve (measured per trial: runs.objective).
QUALITY_METRICS = ("val/acc", "val/loss")
COST_METRICS = ("time/predict_ms_per_image", "model/size_mb", "backbone.params")
OBJECTIVE_METRICS = QUALITY_METRICS + COST_METRICS
MAX_GRID_POINTS = 100_000
MAX_FOLDS = 20


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
class Goal:
    """One objective of a study: a metric every trial logs, and which way is better."""

    metric: str
    direction: str  # "maximize" or "minimize"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``model/size_mb <= 300``: a trial whose metric breaks it is infeasible (never best, never
    registered). ``value`` is Optuna's constraint value: feasible when <= 0."""

    metric: str
    operator: str  # "<=" or ">=" ("<" and ">" read as those: a metric equal to the bound is a tie)
    bound: float

    def value(self, metric_value: float) -> float:
        return metric_value - self.bound if self.operator == "<=" else self.bound - metric_value

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.bound:g}"


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which trial of a multi-objective study is registered: the best on ``metric`` among the
    Pareto-optimal, feasible trials whose runs match ``where`` (MLflow's filter language)."""

    metric: str
    direction: str
    where: str = ""


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Earlier finished trial runs to start from: ``experiment`` or ``study`` (one of them), those
    matching ``where``, at most ``max`` (best first); ``mode`` "results" adds them as finished
    trials, "enqueue" runs their parameters again first."""

    experiment: str | None
    study: str | None
    where: str
    mode: str
    max: int


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


def _option_int(low: int) -> Callable[[Any], int]:
    return number("", int, low, parse=False)


def _option_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{value!r}: expected true or false")
    return value


def _option_choice(*names: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in names:
            raise ConfigError(f"expected one of {', '.join(names)}")
        return value
    return check


_option_positive = number("", float, 0, low_open=True, parse=False)
_option_probability = number("", float, 0, 1, parse=False)
_option_number = number("", float, parse=False)


def _option_resource(value: Any) -> Any:
    return value if value == "auto" else _option_int(1)(value)


def _option_pruner(value: Any) -> Any:
    """PatientPruner's ``wrapped_pruner``: another pruner by name or ``{name: ..., options}``."""
    if isinstance(value, str) and value in PRUNERS and value not in ("patient", "none"):
        return value
    if isinstance(value, dict) and value.get("name") in PRUNERS and value.get("name") not in ("patient", "none"):
        _named_options(Path("<wrapped>"), "pruner", value, PRUNERS, "none")
        return value
    raise ConfigError(f"expected a pruner name or mapping with name: (one of "
                      f"{', '.join(n for n in PRUNERS if n not in ('patient', 'none'))})")


# NSGA-II/III's crossover operators by name (optuna.samplers.nsgaii.<Name>Crossover).
CROSSOVERS = ("uniform", "blxalpha", "sbx", "vsbx", "undx", "spx")


@dataclasses.dataclass(frozen=True)
class SearchMethod:
    """A sampler or pruner a study file may name: the Optuna class it builds (as
    ``"samplers.TPESampler"``: this layer does not import Optuna), the options a file may give it,
    each with its check (so that a study file is refused before any trial rather than with a
    TypeError from Optuna's constructor at the first one), and what studies it can run. Option
    names are the keyword arguments of the Optuna class (tests/test_registries.py checks them).

    Attributes:
        required: options a file must give (PercentilePruner's ``percentile``).
        single_objective_only: refuses a study with several objectives (CMA-ES).
        constraints: uses the trials' constraints in its search (Optuna 5 reads
            ``trial.constraints``; every sampler's study still never picks an infeasible best).
        discrete: runs a finite space only (every dimension categorical, an int range, a
            ``values:`` list or a float ``step``; ``"step"``: a float needs a step).
        numeric: needs at least one int or float dimension (CMA-ES: categorical ones are
            sampled independently, a purely categorical space gives it nothing to do).
        seed_per_trial: a sampler rebuilt per trial with the trial's own seed
            (``search.sampling.TrialSeededSampler``); False where the seed orders something the
            whole study shares (the grid's order, the QMC sequence's scrambling).
        use: what it is for (the README's table and ``--help``).
    """

    optuna_class: str
    options: dict[str, Callable[[Any], Any]]
    required: tuple[str, ...] = ()
    single_objective_only: bool = False
    constraints: bool = False
    discrete: str = ""
    numeric: bool = False
    seed_per_trial: bool = True
    needs_folds: bool = False
    use: str = ""


_NSGA_OPTIONS = {"seed": _option_int(0), "population_size": _option_int(2), "mutation_prob": _option_probability,
                 "crossover": _option_choice(*CROSSOVERS), "crossover_prob": _option_probability,
                 "swapping_prob": _option_probability}

# The registry of samplers and pruners: the one place their names and options are declared.
SAMPLERS: dict[str, SearchMethod] = {
    "tpe": SearchMethod("samplers.TPESampler", {
        "seed": _option_int(0), "n_startup_trials": _option_int(0), "n_ei_candidates": _option_int(1),
        "multivariate": _option_bool, "group": _option_bool, "constant_liar": _option_bool,
        "consider_endpoints": _option_bool, "prior_weight": _option_positive}, constraints=True,
        use="the default: any space, one or several objectives, constraints"),
    "random": SearchMethod("samplers.RandomSampler", {"seed": _option_int(0)},
                           use="a baseline; any space"),
    "grid": SearchMethod("samplers.GridSampler", {"seed": _option_int(0)}, discrete="values",
                         seed_per_trial=False,
                         use="every point of a finite space once (n_trials defaults to the grid's size)"),
    "bruteforce": SearchMethod("samplers.BruteForceSampler", {"seed": _option_int(0),
                                                              "avoid_premature_stop": _option_bool},
                               discrete="step", seed_per_trial=False,
                               use="every point of a finite space, also one whose dimensions depend on others"),
    "gp": SearchMethod("samplers.GPSampler", {
        "seed": _option_int(0), "n_startup_trials": _option_int(0), "deterministic_objective": _option_bool,
        "warn_independent_sampling": _option_bool}, constraints=True,
        use="Gaussian-process Bayesian optimisation: few, costly trials of numeric dimensions"),
    "cmaes": SearchMethod("samplers.CmaEsSampler", {
        "seed": _option_int(0), "n_startup_trials": _option_int(0), "sigma0": _option_positive,
        "popsize": _option_int(1), "consider_pruned_trials": _option_bool, "use_separable_cma": _option_bool,
        "with_margin": _option_bool, "lr_adapt": _option_bool, "warn_independent_sampling": _option_bool},
        single_objective_only=True, numeric=True,
        use="CMA-ES: many trials over continuous dimensions (categorical ones sampled at random)"),
    "qmc": SearchMethod("samplers.QMCSampler", {
        "seed": _option_int(0), "qmc_type": _option_choice("sobol", "halton"), "scramble": _option_bool,
        "warn_independent_sampling": _option_bool, "warn_asynchronous_seeding": _option_bool},
        seed_per_trial=False, use="quasi-random points that cover the space evenly (a better random)"),
    "nsgaii": SearchMethod("samplers.NSGAIISampler", _NSGA_OPTIONS, constraints=True,
                           use="NSGA-II: several objectives, a genetic search of the Pareto front"),
    "nsgaiii": SearchMethod("samplers.NSGAIIISampler", {**_NSGA_OPTIONS, "dividing_parameter": _option_int(1)},
                            constraints=True, use="NSGA-III: three objectives or more"),
}
PRUNERS: dict[str, SearchMethod] = {
    "none": SearchMethod("pruners.NopPruner", {}, use="every trial runs in full"),
    "median": SearchMethod("pruners.MedianPruner", {
        "n_startup_trials": _option_int(0), "n_warmup_steps": _option_int(0), "interval_steps": _option_int(1),
        "n_min_trials": _option_int(1)}, use="stop a trial below the median of others at the same epoch"),
    "percentile": SearchMethod("pruners.PercentilePruner", {
        "percentile": number("", float, 0, 100, parse=False), "n_startup_trials": _option_int(0),
        "n_warmup_steps": _option_int(0), "interval_steps": _option_int(1), "n_min_trials": _option_int(1)},
        required=("percentile",), use="the median pruner at another percentile (25: keep the top quarter)"),
    "successive_halving": SearchMethod("pruners.SuccessiveHalvingPruner", {
        "min_resource": _option_resource, "reduction_factor": _option_int(2),
        "min_early_stopping_rate": _option_int(0), "bootstrap_count": _option_int(0)},
        use="asynchronous successive halving: the best 1/reduction_factor go on at each rung"),
    "hyperband": SearchMethod("pruners.HyperbandPruner", {
        "min_resource": _option_int(1), "max_resource": _option_resource, "reduction_factor": _option_int(2),
        "bootstrap_count": _option_int(0)}, use="successive halving at several budgets at once"),
    "patient": SearchMethod("pruners.PatientPruner", {
        "patience": _option_int(0), "min_delta": number("", float, 0, parse=False), "wrapped_pruner": _option_pruner},
        required=("patience",), use="stop a trial whose objective has not improved for `patience` epochs"),
    "threshold": SearchMethod("pruners.ThresholdPruner", {
        "lower": _option_number, "upper": _option_number, "n_warmup_steps": _option_int(0),
        "interval_steps": _option_int(1)}, use="stop a trial whose objective leaves [lower, upper] (a diverging head)"),
    "wilcoxon": SearchMethod("pruners.WilcoxonPruner", {
        "p_threshold": _option_probability, "n_startup_steps": _option_int(0)}, needs_folds=True,
        use="an SVM study with validation: {folds: K}: stop when its folds are significantly worse than the best's"),
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
    missing = [option for option in table[raw["name"]].required if option not in raw]
    if missing:
        raise file_error(path, f"{key}: the {raw['name']} {key} needs {', '.join(missing)}")
    if raw["name"] == "threshold" and "lower" not in raw and "upper" not in raw:
        raise file_error(path, f"{key}: the threshold {key} needs lower or upper")
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


def _default_direction(metric: str) -> str:
    return "maximize" if metric.endswith("acc") else "minimize"


def _metric_name(path: Path, key: str, metric: Any) -> str:
    if metric not in OBJECTIVE_METRICS:
        raise file_error(path, f"{key}={metric!r}: not a metric a trial logs to be judged on; expected one of "
                               f"{', '.join(OBJECTIVE_METRICS)} (selection never looks at the test split)")
    return metric


def _goals(path: Path, raw: dict) -> tuple[Goal, ...]:
    """The study's objectives: ``objective: {metric, direction}`` or ``objectives:`` a list of them."""
    if "objective" in raw and "objectives" in raw:
        raise file_error(path, "objective and objectives both set; give one (objectives: a list for several)")
    if "objectives" in raw:
        listed = raw["objectives"]
        if not isinstance(listed, list) or not listed:
            raise file_error(path, "objectives: expected a list of {metric, direction}")
        keyed = [(f"objectives[{i}]", item) for i, item in enumerate(listed)]
    else:
        keyed = [("objective", raw.get("objective") or {})]
    goals = []
    for key, item in keyed:
        if not isinstance(item, dict) or set(item) - {"metric", "direction"}:
            raise file_error(path, f"{key}: expected a mapping with metric: and direction:")
        metric = _metric_name(path, f"{key}.metric", item.get("metric", "val/acc"))
        direction = item.get("direction", _default_direction(metric))
        if direction not in ("maximize", "minimize"):
            raise file_error(path, f"{key}.direction={direction!r}: expected maximize or minimize")
        goals.append(Goal(metric, direction))
    if len({g.metric for g in goals}) < len(goals):
        raise file_error(path, "objectives: a metric is listed twice")
    return tuple(goals)


_CONSTRAINT = re.compile(r"^\s*(?:metrics\.)?`?([A-Za-z0-9_./]+)`?\s*(<=|>=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


def _constraints(path: Path, raw: dict) -> tuple[Constraint, ...]:
    """``constraints: ["model/size_mb <= 300", ...]``: a metric, <= or >=, a number."""
    listed = raw.get("constraints") or []
    if not isinstance(listed, list):
        raise file_error(path, 'constraints: expected a list such as ["model/size_mb <= 300"]')
    constraints = []
    for index, text in enumerate(listed):
        found = _CONSTRAINT.match(text) if isinstance(text, str) else None
        if found is None:
            raise file_error(path, f"constraints[{index}]={text!r}: expected 'METRIC <= NUMBER' or "
                                   "'METRIC >= NUMBER', e.g. 'model/size_mb <= 300'")
        metric = _metric_name(path, f"constraints[{index}]", found.group(1))
        constraints.append(Constraint(metric, found.group(2)[0] + "=", float(found.group(3))))
    return tuple(constraints)


def _select(path: Path, raw: dict, goals: tuple[Goal, ...]) -> Selection | None:
    """``select: {metric, where}``: which Pareto-optimal trial is registered (default: the best on
    the first objective)."""
    if "select" not in raw:
        return None
    select = raw["select"]
    if not isinstance(select, dict) or set(select) - {"metric", "where", "direction"}:
        raise file_error(path, "select: expected a mapping with metric: and/or where:")
    metric = _metric_name(path, "select.metric", select.get("metric", goals[0].metric))
    own = {g.metric: g.direction for g in goals}
    direction = select.get("direction", own.get(metric, _default_direction(metric)))
    if direction not in ("maximize", "minimize"):
        raise file_error(path, f"select.direction={direction!r}: expected maximize or minimize")
    where = select.get("where", "")
    if not isinstance(where, str):
        raise file_error(path, "select.where: expected a filter such as \"metrics.`model/size_mb` <= 300\"")
    return Selection(metric, direction, where.strip())


def _warm_start(path: Path, raw: dict) -> WarmStart | None:
    """``warm_start: {experiment: NAME | study: NAME, where: FILTER, as: results|enqueue, max: N}``."""
    if "warm_start" not in raw:
        return None
    warm = raw["warm_start"]
    keys = {"experiment", "study", "where", "as", "max"}
    if not isinstance(warm, dict) or set(warm) - keys:
        raise file_error(path, f"warm_start: expected a mapping with some of: {', '.join(sorted(keys))}")
    if ("experiment" in warm) == ("study" in warm):
        raise file_error(path, "warm_start: name one source, experiment: NAME or study: NAME")
    mode = warm.get("as", "results")
    if mode not in ("results", "enqueue"):
        raise file_error(path, f"warm_start.as={mode!r}: expected results (add their results) or enqueue "
                               "(run their parameters again first)")
    where = warm.get("where", "")
    if not isinstance(where, str):
        raise file_error(path, "warm_start.where: expected a filter such as \"params.layer = 'relu7'\"")
    try:
        most = number("warm_start.max", int, 1, parse=False)(warm.get("max", 100))
    except ConfigError as error:
        raise file_error(path, str(error)) from None
    return WarmStart(experiment=None if "experiment" not in warm else str(warm["experiment"]),
                     study=None if "study" not in warm else str(warm["study"]), where=where.strip(), mode=mode,
                     max=most)


def _folds(path: Path, raw: dict, head: str) -> int | None:
    """``validation: {folds: K}``: stratified K-fold on the training images (svm)."""
    if "validation" not in raw:
        return None
    validation = raw["validation"]
    if not isinstance(validation, dict) or set(validation) != {"folds"}:
        raise file_error(path, "validation: expected {folds: K} (stratified K-fold on the training images)")
    if head != "svm":
        raise file_error(path, f"validation.folds: the {head} head selects on the validation split; folds are "
                               "for the svm head")
    try:
        return number("validation.folds", int, 2, MAX_FOLDS, parse=False)(validation["folds"])
    except ConfigError as error:
        raise file_error(path, str(error)) from None


def _check_search(path: Path, raw: dict, sampler: dict, pruner: dict, spec_parts: dict) -> None:
    """The sampler and pruner can run this study: objectives, space, folds, enqueued points."""
    method = SAMPLERS[sampler["name"]]
    name = sampler["name"]
    space, goals = spec_parts["space"], spec_parts["goals"]
    if method.single_objective_only and len(goals) > 1:
        several = [n for n, m in SAMPLERS.items() if not m.single_objective_only]
        raise file_error(path, f"sampler {name} optimises one objective; this study has {len(goals)} "
                               f"({', '.join(g.metric for g in goals)}): use one of {', '.join(several)}")
    if method.numeric and all(d.type == "categorical" for d in space.values()):
        raise file_error(path, f"sampler {name} searches int and float dimensions; every dimension of this space "
                               "is categorical: use tpe, grid or random")
    if method.discrete:
        for dim_name, dim in space.items():
            if dim.type == "float" and (dim.step is None and (method.discrete == "step" or dim.values is None)):
                need = "a step" if method.discrete == "step" else "a values: list or a step"
                raise file_error(path, f"space.{dim_name}: sampler {name} runs a finite space; a float range needs "
                                       f"{need} (e.g. values: [{dim.low:g}, {dim.high:g}])")
        size = grid_size(space)
        if size > MAX_GRID_POINTS:
            raise file_error(path, f"sampler {name}: the grid has {size:,} points; expected at most {MAX_GRID_POINTS:,}")
        if raw.get("enqueue") or raw.get("warm_start"):
            raise file_error(path, f"sampler {name} runs every point of its grid once; enqueue and warm_start "
                                   "would run points twice: list the points in the space instead")
    if PRUNERS[pruner["name"]].needs_folds and not spec_parts["folds"]:
        raise file_error(path, f"pruner {pruner['name']} compares per-fold results: set validation: {{folds: K}}")
    if len(goals) > 1 and pruner["name"] != "none":
        raise file_error(path, f"pruner {pruner['name']}: Optuna prunes single-objective studies only; "
                               "a study with several objectives takes pruner: none")


def grid_size(space: dict[str, Dimension]) -> int:
    """How many points a grid over ``space`` has (its dimensions' ``grid_points`` multiplied)."""
    size = 1
    for dim in space.values():
        size *= len(dim.grid_points() or ())
    return size


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

    fixed = _fixed(path, raw, overrides or {}, head, space)
    _check_choices(path, head, fixed, space)
    goals = _goals(path, raw)
    sampler = _named_options(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe")
    pruner = _named_options(path, "pruner", raw.get("pruner"), PRUNERS, "none")
    folds = _folds(path, raw, head)
    _check_search(path, raw, sampler, pruner, {"space": space, "goals": goals, "folds": folds})
    n_trials, timeout = _budget(path, raw, grid_size(space) if SAMPLERS[sampler["name"]].discrete else None)
    enqueue = _enqueue(path, raw, head, fixed, space)
    return StudySpec(path=path, study=str(raw["study"]),
                     mlflow_experiment=str(raw.get("experiment", raw["study"])),
                     description=str(raw.get("description", "")).strip(), tunes=head, fixed=fixed,
                     space=space, goals=goals, sampler=sampler, pruner=pruner,
                     n_trials=n_trials, timeout=timeout, enqueue=tuple(enqueue),
                     register=str(raw.get("register", REGISTERED_MODEL) or ""),
                     tuning=_tuning(path, raw, head, fixed, space), constraints=_constraints(path, raw),
                     select=_select(path, raw, goals), warm_start=_warm_start(path, raw), folds=folds)
