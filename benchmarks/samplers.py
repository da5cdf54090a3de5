"""Which Optuna sampler should a study use: trials to the grid's best, and what the sampler costs.

The objective is a real one: the package's linear SVM head (``compute.training.fit_head``) on
the package's own cached features (VGG16 with RANDOM weights, scikit-learn's digits at 32 px,
``train_per_class`` 100: 800 images to train, 200 to validate), maximising ``val/acc``. The
features of every layer are computed once, before anything is timed; a trial is then one
``fit_head`` with the trial's C (and layer). Two search spaces, as a study file writes them:

- **C alone**: C log-uniform in [1e-5, 1e2], layer relu7 (sweeps/svm_c.yaml's question);
- **C x layer**: the same C and layer categorical over relu7, fc7, relu6, fc6, pool5.

The reference is a grid: ``--grid-points`` log-spaced C (``np.geomspace``) x the five layers,
every point fitted once (the C-alone grid is the relu7 row of it); its best ``val/acc`` is the
target. Each sampler of ``--samplers`` is built the way a study file's is
(``search.sampling.make_sampler``, from the ``specs.studies.SAMPLERS`` registry, Optuna's
defaults) and run for ``--n-trials`` trials with each of ``--seeds`` seeds, parameters
suggested as the package suggests them (``search.sampling.suggest``), in-memory storage. The
runs are interleaved (seed by seed, every sampler and space in turn), so a slow period of the
machine is shared rather than landing on one sampler. Printed per space and sampler:

- trials to come within ``--tolerance`` (0.005: half a point, one validation image of 200) of
  the grid's best: median over seeds and min..max, "not in N" when a seed never did;
- the best ``val/acc`` the study reached (median over seeds, min..max);
- the sampler's own time per trial: a trial's wall time (one optimize-loop iteration: ask,
  sample, suggest, objective, tell) less the objective's ``fit_head``; median over all trials of
  all seeds, and over the last quarter of the trials (where a model-based sampler has the most
  history to fit);
- the objective's median time per trial (for scale), the share of trials on pool5 and a
  study's median time (sampler + fits: a sampler that picks the costly pool5 layer more often
  makes its studies slower);
- how many first trials were the random sampler's, point for point, with the same seed.

Identical (C, layer) points within a space are fitted once and looked up after, across samplers
and seeds (the SVM is deterministic: same value, same trial counts). It saves much: TPE's and
GP's start-up trials (Optuna's default 10) are the random sampler's with the same seed, the
first trial of CMA-ES and QMC too, and QMC's unscrambled Sobol points are the same for every
seed. A look-up counts no time in the sampler's column and its point's measured fit in the
objective's and the study's columns. The grid never looks up.

A study run by ``scenesweep sweep`` wraps the same sampler in ``search.sampling.TrialSeededSampler``
(rebuilt per trial with a seed drawn from the study's seed and the trial number, so that workers
differ): the same algorithm with the same defaults, other random draws. Here the sampler is used
as built, one object per study.

Usage:
    .venv/bin/python benchmarks/samplers.py [--n-trials 40] [--seeds 5] [--grid-points 30]
        [--samplers tpe,gp,cmaes,qmc,random] [--cache-dir DIR]

A trial costs one SVM fit: under a second on a 4096-wide layer, several seconds on pool5 (25088
wide) on a slow 2-core machine, so the defaults take the better part of an hour there;
``--n-trials 20 --grid-points 15`` about a third of that on an idle machine.

Timings and accuracies are this machine's and this data's: with random weights the accuracies
are demo figures of an untrained network, not 15-Scene results. Compare only numbers from one
run. No wall-clock assertion: the script prints, it does not judge.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import load_average, machine_line, median, table  # noqa: E402  (puts src/ on the path when needed)

LAYERS = ("relu7", "fc7", "relu6", "fc6", "pool5")  # VGG16's taps, cheapest input first (pool5: 25088 wide)
SAMPLERS = ("tpe", "gp", "cmaes", "qmc", "random")  # the registry's single-objective samplers for a continuous space
C_LOW, C_HIGH = 1e-5, 1e2
LEGEND = ("trials to >= target: the trial number (1-based) at which a seed's study first came within the tolerance "
          "of the grid's best; median over seeds (min..max). seeds: how many got there. best val/acc: the "
          "study's best, median over seeds (min..max). sampler ms: a trial's wall time less its fit (ask, "
          "sampling, suggest, tell: Optuna's share), median over all trials and over the last quarter. fit ms: "
          "the objective's median fit per trial (a looked-up point counts the time its fit took). pool5: share of "
          "trials on pool5 (its fit costs most). study s: median over seeds of a study's time had it fitted every "
          "trial (sampler + fits). = random: median number of first trials identical to the random sampler's "
          "with the same seed (TPE's and GP's start-up trials are the random sampler's).")  # under the tables


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# The objective: the package's SVM head on cached features
# --------------------------------------------------------------------------------------------

class Features:
    """Every layer's features, computed once through the package (``training.prepare``)."""

    def __init__(self, base: dict[str, Any], layers: tuple[str, ...]):
        from scenesweep.compute import training
        from scenesweep.core.config import make_config

        self.base = base
        self.data = training.load_data(make_config("svm", {**base, "layer": layers[0]}))
        self.prepared = {}
        self.seconds = {}
        for layer in layers:
            began = time.perf_counter()
            self.prepared[layer] = training.prepare(make_config("svm", {**base, "layer": layer}),
                                                    progress=False, data=self.data)
            self.seconds[layer] = time.perf_counter() - began

    def fit(self, C: float, layer: str) -> tuple[float, float]:
        """(val/acc, seconds) of one SVM fit: what a trial of a study runs, tracking aside."""
        from scenesweep.compute import training
        from scenesweep.core.config import make_config

        began = time.perf_counter()
        result = training.fit_head(self.prepared[layer], make_config("svm", {**self.base, "layer": layer, "C": C}))
        return float(result.metrics["val/acc"]), time.perf_counter() - began


@dataclasses.dataclass
class Space:
    name: str
    dimensions: dict  # name -> specs.studies.Dimension
    layers: tuple[str, ...]
    memo: dict = dataclasses.field(default_factory=dict)  # (C, layer) -> (val/acc, seconds of its fit)


def make_spaces() -> list[Space]:
    from scenesweep.specs.studies import Dimension

    c = Dimension("C", "float", low=C_LOW, high=C_HIGH, log=True)
    return [Space("C alone", {"C": c}, ("relu7",)),
            Space("C x layer", {"C": c, "layer": Dimension("layer", "categorical", choices=LAYERS)}, LAYERS)]


class Objective:
    """``suggest`` as the package does, then one fit; records per trial the seconds spent in the
    fit here (0 for a look-up) and the seconds that point's fit took when it was run."""

    def __init__(self, features: Features, space: Space):
        self.features = features
        self.space = space
        self.spent: dict[int, float] = {}  # trial number -> seconds in fit_head in this trial (0: a look-up)
        self.cost: dict[int, float] = {}  # trial number -> seconds its point's fit took (looked up or not)

    def __call__(self, trial) -> float:
        from scenesweep.search.sampling import suggest

        params = suggest(trial, self.space.dimensions)  # independent samplers sample here: the sampler's time
        key = (float(params["C"]), params.get("layer", self.space.layers[0]))
        if key in self.space.memo:
            value, seconds = self.space.memo[key]
            self.spent[trial.number], self.cost[trial.number] = 0.0, seconds
            return value
        value, seconds = self.features.fit(*key)
        self.space.memo[key] = (value, seconds)
        self.spent[trial.number] = self.cost[trial.number] = seconds
        return value


# --------------------------------------------------------------------------------------------
# Grid and studies
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Grid:
    Cs: list[float]
    values: dict  # (C, layer) -> val/acc
    seconds: dict  # (C, layer) -> seconds of its fit

    def best(self, layers: tuple[str, ...]) -> tuple[float, float, str]:
        (C, layer), value = max(((k, v) for k, v in self.values.items() if k[1] in layers),
                                key=lambda item: (item[1], -LAYERS.index(item[0][1]), item[0][0]))
        return value, C, layer

    def within(self, layers: tuple[str, ...], target: float) -> int:
        return sum(1 for (_, layer), v in self.values.items() if layer in layers and v >= target - 1e-9)

    def size(self, layers: tuple[str, ...]) -> int:
        return sum(1 for (_, layer) in self.values if layer in layers)


def run_grid(features: Features, points: int) -> Grid:
    import numpy as np

    Cs = [float(c) for c in np.geomspace(C_LOW, C_HIGH, points)]
    values, seconds = {}, {}
    for layer in LAYERS:
        for C in Cs:
            values[(C, layer)], seconds[(C, layer)] = features.fit(C, layer)
    return Grid(Cs, values, seconds)


@dataclasses.dataclass
class StudyRun:
    sampler: str
    seed: int
    values: list[float]  # per trial, in trial order
    params: list[tuple]  # per trial: (C, layer)
    trial_s: list[float]  # per trial: one optimize-loop iteration
    spent_s: list[float]  # per trial: seconds in the fit here (0 for a look-up)
    fit_s: list[float]  # per trial: seconds its point's fit took, when it was run

    @property
    def sampler_s(self) -> list[float]:
        return [max(0.0, t - f) for t, f in zip(self.trial_s, self.spent_s)]

    @property
    def study_s(self) -> float:
        """The study's wall time had every trial fitted its point (no look-ups)."""
        return sum(self.sampler_s) + sum(self.fit_s)

    @property
    def layers(self) -> list[str]:
        return [layer for _, layer in self.params]

    def trials_to(self, target: float) -> float:
        for number, value in enumerate(self.values, start=1):
            if value >= target - 1e-9:
                return number
        return math.inf

    def same_start(self, other: "StudyRun") -> int:
        """How many first trials sampled exactly the points ``other``'s did."""
        count = 0
        for mine, theirs in zip(self.params, other.params):
            if mine != theirs:
                break
            count += 1
        return count


def run_study(features: Features, space: Space, sampler_name: str, seed: int, n_trials: int) -> StudyRun:
    import optuna

    from scenesweep.search.sampling import make_sampler

    sampler = make_sampler(sampler_name, seed, space.dimensions)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    objective = Objective(features, space)
    marks: list[float] = []
    began = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, callbacks=[lambda study, trial: marks.append(time.perf_counter())])
    trials = sorted(study.trials, key=lambda t: t.number)
    starts = [began] + marks[:-1]
    return StudyRun(sampler_name, seed, [t.value for t in trials],
                    [(float(t.params["C"]), t.params.get("layer", space.layers[0])) for t in trials],
                    [end - start for start, end in zip(starts, marks)],
                    [objective.spent[t.number] for t in trials], [objective.cost[t.number] for t in trials])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def spread(values: list[float], n_trials: int, digits: int = 0) -> str:
    def show(x: float) -> str:
        return f"not in {n_trials}" if math.isinf(x) else f"{x:.{digits}f}"

    middle = statistics.median(values)  # inf counts as a seed that never got there
    return f"{show(middle)} ({show(min(values))}..{show(max(values))})"


def report_space(space: Space, grid: Grid, runs: list[StudyRun], samplers: list[str], n_trials: int,
                 tolerance: float) -> None:
    best, best_C, best_layer = grid.best(space.layers)
    target = best - tolerance
    size = grid.size(space.layers)
    near = grid.within(space.layers, target)
    say(f"{space.name}: {' x '.join(space.dimensions)}; C log-uniform in [{C_LOW:g}, {C_HIGH:g}]"
        + (f", layer in {{{', '.join(space.layers)}}}" if len(space.layers) > 1 else f" at {space.layers[0]}"))
    say(f"   grid: {len(grid.Cs)} C x {len(space.layers)} layer{'s' if len(space.layers) > 1 else ''} = {size} points, "
        f"best val/acc {best:.3f} (C={best_C:.3g}, {best_layer}); target >= {target:.3f}, which {near} of the "
        f"{size} grid points ({near / size:.0%}) reach")
    rows = []
    for name in samplers:
        mine = [r for r in runs if r.sampler == name]
        if not mine:
            continue
        reached = [r.trials_to(target) for r in mine]
        bests = [max(r.values) for r in mine]
        sampler_ms = [s * 1e3 for r in mine for s in r.sampler_s]
        tail = max(1, n_trials // 4)
        late_ms = [s * 1e3 for r in mine for s in r.sampler_s[-tail:]]
        pool5 = sum(layer == "pool5" for r in mine for layer in r.layers) / sum(len(r.layers) for r in mine)
        randoms = {r.seed: r for r in runs if r.sampler == "random"}
        same = [r.same_start(randoms[r.seed]) for r in mine if r.seed in randoms]
        rows.append([name, spread(reached, n_trials), f"{sum(not math.isinf(x) for x in reached)}/{len(mine)}",
                     f"{median(bests):.3f} ({min(bests):.3f}..{max(bests):.3f})",
                     f"{median(sampler_ms):.1f}", f"{median(late_ms):.1f}",
                     f"{median([f for r in mine for f in r.fit_s]) * 1e3:.0f}",
                     f"{pool5:.0%}" if len(space.layers) > 1 else "-",
                     f"{median([r.study_s for r in mine]):.0f}",
                     f"{median(same):.0f}" if same and name != "random" else "-"])
    say(table(["sampler", f"trials to >= {target:.3f}", "seeds", "best val/acc", "sampler ms",
               f"last {max(1, n_trials // 4)}", "fit ms", "pool5", "study s", "= random"], rows, indent="   "))
    say()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-trials", "--n_trials", dest="n_trials", type=int, default=40,
                        help="trials per study (default 40)")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds 0..N-1 per sampler and space (default 5)")
    parser.add_argument("--grid-points", "--grid_points", dest="grid_points", type=int, default=30,
                        help="log-spaced C values of the reference grid, times the 5 layers (default 30)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help=f"comma-separated registry names (default {','.join(SAMPLERS)})")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="how close to the grid's best counts as there, in val/acc (default 0.005)")
    parser.add_argument("--train-per-class", "--train_per_class", dest="train_per_class", type=int, default=100,
                        help="digits per class to train and validate on (default 100)")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="feature cache folder (default: a temporary folder, removed at the end; give one "
                             "to reuse the features across runs)")
    args = parser.parse_args(argv)
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    return args


def say_header(args: argparse.Namespace, cache: Path, temporary: bool) -> None:
    """The machine, the library versions, the load and what this run measures on which data."""
    import optuna
    import sklearn
    import torch

    say(f"machine: {machine_line()}")
    say(f"optuna {optuna.__version__}, scikit-learn {sklearn.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average at start: {load_average()}")
    say(f"{', '.join(args.samplers)} x {args.seeds} seeds x {args.n_trials} trials per space; grid "
        f"{args.grid_points} C x {len(LAYERS)} layers; cache {cache}{' (temporary)' if temporary else ''}")
    say("Data: scikit-learn digits (8x8, upscaled) at 32 px, VGG16 with RANDOM weights, "
        f"train_per_class {args.train_per_class}: accuracies are demo figures, not 15-Scene results.\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("SCENESWEEP_OFFLINE", "1")  # random weights: nothing to download
    os.environ["TQDM_DISABLE"] = "1"
    import optuna

    from scenesweep.specs.studies import SAMPLERS as REGISTRY

    unknown = [s for s in args.samplers if s not in REGISTRY]
    if unknown:
        raise SystemExit(f"--samplers: unknown {', '.join(unknown)}; the registry has {', '.join(REGISTRY)}")
    # CmaEsSampler samples the categorical layer independently and says so; QMC/GP notes: known, not news.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module=r"optuna(\.|$)")
    logging.getLogger("optuna").setLevel(logging.ERROR)

    temporary = args.cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="scenesweep-samplers-bench-")) if temporary else Path(args.cache_dir)
    started = time.perf_counter()
    try:
        say_header(args, cache, temporary)

        base = {"data": "digits", "weights": "random", "arch": "vgg16", "image_size": 32,
                "train_per_class": args.train_per_class, "cache_dir": str(cache)}
        began = time.perf_counter()
        features = Features(base, LAYERS)
        prepared = features.prepared[LAYERS[0]]
        say(f"features (computed once, or read from the cache; not counted): {time.perf_counter() - began:.1f} s; "
            f"{len(prepared.split.train)} train / {len(prepared.split.val)} val images; "
            + ", ".join(f"{layer} {features.prepared[layer].features.values.shape[1]}" for layer in LAYERS))

        began = time.perf_counter()
        grid = run_grid(features, args.grid_points)
        fit_by_layer = {layer: median([grid.seconds[key] for key in grid.seconds if key[1] == layer]) for layer in LAYERS}
        say(f"grid: {len(grid.seconds)} fits in {time.perf_counter() - began:.0f} s; median fit "
            + ", ".join(f"{layer} {fit_by_layer[layer] * 1e3:.0f} ms" for layer in LAYERS) + "\n")

        spaces = make_spaces()
        runs: dict[str, list[StudyRun]] = {space.name: [] for space in spaces}
        for seed in range(args.seeds):
            for space in spaces:
                for name in args.samplers:
                    runs[space.name].append(run_study(features, space, name, seed, args.n_trials))
            say(f"   seed {seed} done: {time.perf_counter() - started:.0f} s, load average {load_average()}")
        say()

        for space in spaces:
            report_space(space, grid, runs[space.name], args.samplers, args.n_trials, args.tolerance)
        say(LEGEND)
        say(f"load average at end: {load_average()}; {time.perf_counter() - started:.0f} s in all")
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
