"""Samplers and pruners by name, and the sampler rebuilt per trial with a seed of its own.

No MLflow here.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from ..core.errors import ConfigError
from ..specs.search_methods import PRUNERS, SAMPLERS, SearchMethod
from ..specs.studies import Dimension, StudySpec

def optuna_class(method: SearchMethod) -> type:
    """The Optuna class a registered sampler or pruner names (``specs.studies.SAMPLERS``/``PRUNERS``)."""
    module, name = method.optuna_class.split(".")
    return getattr(getattr(optuna, module), name)


def make_sampler(name: str, seed: int | None, space: dict[str, Dimension] | None = None,
                 **options: Any) -> optuna.samplers.BaseSampler:
    """The registered sampler ``name`` with a study file's options (names turned into Optuna's
    objects: NSGA's ``crossover: sbx`` -> ``SBXCrossover()``); ``space``: the grid's dimensions."""
    if name == "grid":
        options["search_space"] = {n: list(d.grid_points()) for n, d in (space or {}).items()}
    if "crossover" in options:
        crossover = options["crossover"]
        options["crossover"] = getattr(optuna.samplers.nsgaii, {
            "uniform": "UniformCrossover", "blxalpha": "BLXAlphaCrossover", "sbx": "SBXCrossover",
            "vsbx": "VSBXCrossover", "undx": "UNDXCrossover", "spx": "SPXCrossover"}[crossover])()
    with warnings.catch_warnings():
        # QMC, NSGA-III, brute force are marked experimental in Optuna 5: known, chosen by the file.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna_class(SAMPLERS[name])(seed=seed, **options)


def make_pruner(name: str, **options: Any) -> optuna.pruners.BasePruner:
    """The registered pruner ``name``; PatientPruner's ``wrapped_pruner`` given by name or mapping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # WilcoxonPruner, PatientPruner
        if name == "patient":
            wrapped = options.pop("wrapped_pruner", None)
            if isinstance(wrapped, str):
                wrapped = {"name": wrapped}
            inner = make_pruner(wrapped["name"], **{k: v for k, v in wrapped.items() if k != "name"}) if wrapped else None
            return optuna_class(PRUNERS[name])(inner, **options)
        return optuna_class(PRUNERS[name])(**options)


def trial_seed(study_seed: int | None, number: int) -> int | None:
    """The sampler seed of trial ``number``: a function of the study's seed and the number only."""
    if study_seed is None:
        return None
    return int(np.random.SeedSequence([int(study_seed), int(number)]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """The study file's sampler, built afresh for each trial with ``trial_seed(seed, number)``.

    Every worker builds the sampler from the study file with the same seed: sampled as is,
    parallel workers (and a resume) would draw the same random start-up points. Trial numbers
    are unique in the storage, so seeding by them keeps one worker's seeded study reproducible
    while no two trials share a seed. What the sampler learns comes from the study's trials in
    the storage, not from the sampler object, so nothing is lost by rebuilding it.
    """

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None,
                 per_trial: bool = True):
        self._make = make
        self._seed = seed
        self._per_trial = per_trial  # False: the study's seed for every trial (a grid's order, a QMC sequence)
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}
        self._lock = threading.Lock()

    def seed_of(self, number: int) -> int | None:
        return trial_seed(self._seed, number) if self._per_trial else self._seed

    def _sampler(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._by_trial:
                self._by_trial[trial.number] = self._make(self.seed_of(trial.number))
            return self._by_trial[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        try:
            self._sampler(trial).after_trial(study, trial, state, values)
        except RuntimeError as error:
            # GridSampler calls study.stop() once its grid is done, which Optuna allows only inside
            # Study.optimize; our trials are asked and told by hand, and the budget (the grid's size)
            # stops the workers.
            if "Study.stop" not in str(error):
                raise
        with self._lock:
            self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:  # seeds come from trial numbers
        pass


def build_sampler(spec: StudySpec) -> TrialSeededSampler:
    """The study file's sampler (rebuilt per trial: ``TrialSeededSampler``). Samplers that use
    constraints read them from each trial (Optuna 5's ``trial.constraints``, set by the objective)."""
    options = {k: v for k, v in spec.sampler.items() if k not in ("name", "seed")}
    name = spec.sampler["name"]
    return TrialSeededSampler(lambda seed: make_sampler(name, seed, spec.space, **dict(options)),
                              spec.sampler.get("seed"), per_trial=SAMPLERS[name].seed_per_trial)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    try:
        return make_pruner(spec.pruner["name"], **{k: v for k, v in spec.pruner.items() if k != "name"})
    except (TypeError, ValueError) as error:  # an option Optuna refuses (studies.py checks the names)
        raise ConfigError(f"{spec.path}: pruner: {error}") from None


def check_sampler(spec: StudySpec) -> None:
    """Build the sampler once: an option Optuna refuses is one error naming the file."""
    try:
        make_sampler(spec.sampler["name"], spec.sampler.get("seed"), spec.space,
                     **{k: v for k, v in spec.sampler.items() if k not in ("name", "seed")})
    except (TypeError, ValueError, ImportError) as error:
        raise ConfigError(f"{spec.path}: sampler {spec.sampler['name']}: {error}") from None


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """Ask the trial for one value per space dimension."""
    params = {}
    for name, dim in space.items():
        if dim.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
    return params
