"""The registry of samplers and pruners a study file may name, and whether they can run a study.

Each entry names the Optuna class it builds (``"samplers.TPESampler"``: this layer imports no
Optuna; ``search.sampling`` builds them), its options with their checks (option names are the
class's keyword arguments: ``tests/test_registries.py`` checks them against Optuna), and what
studies it can run (one objective or several, constraints, a finite space, numeric dimensions).

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..core.config import number
from ..core.errors import ConfigError, file_error

MAX_GRID_POINTS = 100_000


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
        named_options(Path("<wrapped>"), "pruner", value, PRUNERS, "none")
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


def named_options(path: Path, key: str, raw: Any, table: dict[str, SearchMethod], default: str) -> dict[str, Any]:
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


def check_search(path: Path, raw: dict, sampler: dict, pruner: dict, spec_parts: dict) -> None:
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


def grid_size(space: dict[str, Any]) -> int:
    """How many points a grid over ``space`` (name -> ``studies.Dimension``) has: its dimensions'
    ``grid_points`` multiplied."""
    size = 1
    for dim in space.values():
        size *= len(dim.grid_points() or ())
    return size
