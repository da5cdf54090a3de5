"""What a sweep answers: the study's trials, and what its summary found (``runs.sweep.run_study``).

``StudyOutcome`` holds the counts every worker knows; ``Summary`` what the worker that summarised
the study found: the best (or selected) trial, or why there is none. ``summary_lines`` is what the
command line prints from them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..compute.training import RunResult
from ..specs.studies import StudySpec


@dataclasses.dataclass
class BestTrial:
    """The study's best trial (its selected one, multi-objective) and what the summary did with it.

    Attributes:
        number: the Optuna trial number; params: its parameters.
        values: each objective's value, in the study file's order (``spec.metrics``).
        run_id: its MLflow run ('' for a warm-start trial without one).
        result: its head scored on test, once (``test/acc`` in ``result.metrics``).
        model_version: the version this summary registered (None: none registered here).
        alias: how that version was aliased (e.g. "(alias @challenger)").
    """

    number: int
    params: dict[str, Any]
    values: dict[str, float]
    run_id: str
    result: RunResult
    model_version: str | None = None
    alias: str = ""

    @property
    def value(self) -> float:
        """The first objective's value (the single objective's)."""
        return next(iter(self.values.values()))

    @property
    def test_acc(self) -> float:
        return self.result.metrics["test/acc"]


@dataclasses.dataclass
class Summary:
    """What summarising a study gave: its best trial; or ``error`` (no trial completed, or none
    could be chosen: the parent run FAILED); or ``note`` (the study ran well, its select rule
    picked no trial: nothing registered, not a failure)."""

    best: BestTrial | None = None
    error: str = ""
    note: str = ""


@dataclasses.dataclass
class StudyOutcome:
    """A sweep's answer.

    Attributes:
        parent_run_id, study: the study's parent MLflow run and its Optuna name.
        trials: trials in the study; states: their count per state ("COMPLETE", "PRUNED", ...).
        ran_here: trials this worker ran; finished: trials finished (the budget's count).
        summary: what this worker's summary found (None: another worker still runs trials and
            summarises when they end).
    """

    parent_run_id: str
    study: str
    trials: int
    states: dict[str, int]
    ran_here: int
    finished: int
    summary: Summary | None = None

    @property
    def summarised(self) -> bool:
        return self.summary is not None

    @property
    def best(self) -> BestTrial | None:
        return self.summary.best if self.summary else None

    @property
    def error(self) -> str:
        return self.summary.error if self.summary else ""


def summary_lines(outcome: StudyOutcome, spec: StudySpec) -> list[str]:
    """What a sweep prints: the study's trials, then its best trial (or who will summarise)."""
    states = ", ".join(f"{k.lower()}={v}" for k, v in outcome.states.items() if v)
    lines = [f"study {outcome.study}: {outcome.trials} trials ({states}), {outcome.ran_here} run by "
             f"this worker; parent run {outcome.parent_run_id}"]
    if not outcome.summarised:
        lines.append("another worker is still running trials of this study: it summarises the study "
                     "(best trial, test accuracy, registered model) when they end")
    best = outcome.best
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        values = ", ".join(f"{m}={v:.4f}" for m, v in best.values.items())
        what = "selected trial" if spec.multi_objective else "best trial"
        lines.append(f"{what} #{best.number}: {values} ({params}); test/acc={best.test_acc:.4f}")
        if best.model_version:
            lines.append(f"registered {spec.register} version {best.model_version} "
                         + (best.alias or "(alias @challenger)"))
    return lines
