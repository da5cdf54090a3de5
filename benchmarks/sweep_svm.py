"""Section 1 of benchmarks/sweep.py: an N-trial sweep_svm (sweeps/svm_c.yaml) on a fresh cache
against N independent single runs with the trials' parameters, each with its own empty cache.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, the other sweep_*.py modules
from _common import median  # noqa: E402
from sweep_common import (IMAGE_SIZE, SWEEPS, child_runs, duration_s, fresh_cache, load_trials, plural,  # noqa: E402
                           say, table, trial_number)
from sweep_instrument import Instrument  # noqa: E402


@dataclasses.dataclass
class SvmResult:
    n: int
    images: int
    sweep_s: float
    singles_s: list[float]
    sweep_children_s: list[float]
    sweep_extract_s: float
    singles_extract_s: list[float]
    order: str  # when the single runs ran, relative to the sweep
    trial_config: Any  # RunConfig of the first trial, for section 4

    @property
    def ratio(self) -> float:
        return sum(self.singles_s) / self.sweep_s


@dataclasses.dataclass
class SvmSweep:
    """One timed sweep_svm study: its wall time, its trial runs and what its features cost."""

    seconds: float
    extract_s: float  # sum of the study's compute_features calls
    children: list  # MLflow child runs, in trial order
    trials: dict  # trial number -> optuna FrozenTrial
    summary: Any  # runs.sweep.run_study's summary


def bench_svm(tmp: Path, storage: str, instrument: Instrument, n_trials: int, data: str,
              train_per_class: int | None, image_size: int = IMAGE_SIZE, naive: int | None = None) -> SvmResult:
    """N-trial sweep_svm on a fresh cache against N single runs with the trials' parameters.

    The first single run goes before the sweep and the others after it, so that a change of
    load on a shared machine does not fall on one side only: trial 0 of a fresh study is the
    study's first enqueued point, known before the study runs; later trials are sampled. With
    ``naive`` only that many single runs are timed (each extracts every image from nothing, so
    they cost alike) and the N single runs are their mean times N.
    """
    from scenesweep.specs.studies import load_study

    overrides: dict[str, Any] = {"data": data, "image_size": image_size}
    if train_per_class is not None:
        overrides["train_per_class"] = train_per_class
    spec = load_study(SWEEPS / "svm_c.yaml", overrides)

    singles: dict[int, tuple[float, float]] = {}  # trial number -> (run s, features s)
    first_known = bool(spec.enqueue) and set(spec.enqueue[0]) == set(spec.space)
    if first_known:
        run_single(tmp, instrument, singles, 0, {**spec.fixed, **spec.enqueue[0]})

    overrides["cache_dir"] = str(fresh_cache(tmp, "svm-sweep"))  # memo cleared too
    spec = load_study(SWEEPS / "svm_c.yaml", overrides)
    # One study per data and size: the digits study and the --scenes one share the storage, and a
    # study refuses to resume under another setting.
    study_name = f"{spec.study}@{Path(data).name}-{image_size}px"
    sweep = run_svm_sweep(spec, storage, instrument, n_trials, study_name)
    trials = sweep.trials
    if first_known and trials[0].params != spec.enqueue[0]:
        say(f"   (trial 0 ran {trials[0].params}, not the enqueued {spec.enqueue[0]}: single run 0 repeated)")
        del singles[0]
    for child in sweep.children:
        number = trial_number(child)
        if number not in singles and (naive is None or len(singles) < naive):
            run_single(tmp, instrument, singles, number, {**spec.fixed, **trials[number].params})
    first_before = first_known and 0 in singles and len(sweep.children) > 1
    return svm_result(spec, sweep, singles, naive, first_before)


def run_single(tmp: Path, instrument: Instrument, singles: dict[int, tuple[float, float]], number: int,
               values: dict) -> None:
    """One single run of trial ``number``'s ``values``; records (run s, features s) in ``singles``."""
    from scenesweep.runs.single import track_single_run

    # A hand-written loop without a cache: its own empty folder, nothing memoised.
    values = {**values, "cache_dir": str(fresh_cache(tmp, f"svm-single-{number}"))}
    start = len(instrument.records)
    began = time.perf_counter()
    track_single_run("svm", values, progress=False)
    singles[number] = (time.perf_counter() - began, sum(r.total_s for r in instrument.since(start)))


def run_svm_sweep(spec, storage: str, instrument: Instrument, n_trials: int, study_name: str) -> SvmSweep:
    """Run the study, timed, and read back its child runs and finished trials."""
    from scenesweep.runs.sweep import run_study

    start = len(instrument.records)
    began = time.perf_counter()
    summary = run_study(spec, storage=storage, study_name=study_name, n_trials=n_trials, progress=False,
                        register=False)
    seconds = time.perf_counter() - began
    extract_s = sum(r.total_s for r in instrument.since(start))
    children = child_runs(summary.parent_run_id)
    trials = {t.number: t for t in load_trials(study_name, storage)}
    return SvmSweep(seconds, extract_s, children, trials, summary)


def svm_result(spec, sweep: SvmSweep, singles: dict[int, tuple[float, float]], naive: int | None,
               first_before: bool) -> SvmResult:
    """The sweep against the single runs, in the sweep's trial order."""
    children = sweep.children
    ordered = [singles[trial_number(c)] for c in children if trial_number(c) in singles]
    if naive is not None:  # the timed ones stand for all N
        ordered = [(statistics.mean(o[0] for o in ordered), statistics.mean(o[1] for o in ordered))] * len(children)
    first = spec.trial_config(sweep.trials[trial_number(children[0])].params)
    images = len(sweep.summary.best.result.prepared.dataset.paths)
    order = ("single run 0 before the sweep, the others after it" if first_before
             else "the sweep first, then the single runs")
    return SvmResult(len(children), images, sweep.seconds, [o[0] for o in ordered],
                     [duration_s(c) for c in children], sweep.extract_s, [o[1] for o in ordered], order, first)


def report_svm(r: SvmResult, data_label: str) -> None:
    trials_s = sum(r.sweep_children_s)
    say(f"1. sweep_svm (sweeps/svm_c.yaml), {plural(r.n, 'trial')}, {data_label} ({r.images} images), "
        f"fresh cache; order: {r.order}")
    say(table(["", "wall s", "per trial s", "of which features s"], [
        ["sweep (one study, shared cache)", f"{r.sweep_s:.1f}", f"{r.sweep_s / r.n:.1f}", f"{r.sweep_extract_s:.1f}"],
        [f"single runs x{r.n} (own empty cache each)", f"{sum(r.singles_s):.1f}",
         f"{sum(r.singles_s) / r.n:.1f}", f"{sum(r.singles_extract_s):.1f}"]]))
    later = r.sweep_children_s[1:]
    say(f"   sweep: trial runs {trials_s:.1f} s (first trial, which extracts, {r.sweep_children_s[0]:.1f} s; "
        f"later trials median {median(later):.1f} s), study set-up + summary (refit of the best trial, "
        f"one test evaluation, plots) {r.sweep_s - trials_s:.1f} s")
    say(f"   single runs: median {median(r.singles_s):.1f} s each, of which features {median(r.singles_extract_s):.1f} s; "
        "they also log a model, a dataset manifest and a test evaluation each, which sweep trials leave to the summary")
    say(f"   -> N single runs / sweep = {r.ratio:.2f}x; marginal trial: single run {median(r.singles_s):.1f} s "
        f"against a cached sweep trial {median(later):.1f} s")
    say()

