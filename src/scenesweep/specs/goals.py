"""What a study's trials are judged on: its objectives, constraints, the selection rule of a
multi-objective study, warm starts from earlier runs, cross-validated selection.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..core.config import number
from ..core.errors import ConfigError, file_error

# What a trial is judged on: its validation results (selection never reads the test split) and
# what its model costs to serve (measured per trial: runs.objective).
QUALITY_METRICS = ("val/acc", "val/loss")
COST_METRICS = ("time/predict_ms_per_image", "model/size_mb", "backbone.params")
OBJECTIVE_METRICS = QUALITY_METRICS + COST_METRICS
MAX_FOLDS = 20


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


def _default_direction(metric: str) -> str:
    return "maximize" if metric.endswith("acc") else "minimize"


def _metric_name(path: Path, key: str, metric: Any) -> str:
    if metric not in OBJECTIVE_METRICS:
        raise file_error(path, f"{key}={metric!r}: not a metric a trial logs to be judged on; expected one of "
                               f"{', '.join(OBJECTIVE_METRICS)} (selection never looks at the test split)")
    return metric


def goals(path: Path, raw: dict) -> tuple[Goal, ...]:
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


def constraints(path: Path, raw: dict) -> tuple[Constraint, ...]:
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


def select(path: Path, raw: dict, goals: tuple[Goal, ...]) -> Selection | None:
    """``select: {metric, where}``: which Pareto-optimal trial is registered (default: the best on
    the first objective)."""
    if "select" not in raw:
        return None
    select = raw["select"]
    if len(goals) == 1:
        raise file_error(path, "select: picks which trial of a Pareto front (several objectives) is registered; "
                               "with one objective the best trial is, and constraints: say what it must meet")
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


def warm_start(path: Path, raw: dict) -> WarmStart | None:
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


def folds(path: Path, raw: dict, head: str) -> int | None:
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
