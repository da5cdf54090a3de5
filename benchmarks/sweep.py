"""Benchmark the three sweeps against what they save: extractions, fc layers, epochs, logging.

One run measures, in one process, against temporary MLflow and Optuna stores and temporary
feature caches (never the project's ``mlruns/`` or ``.cache``):

1. ``sweep_svm`` (sweeps/svm_c.yaml, digits, 32 px, fresh cache): the wall time of an N-trial
   study against N independent single runs (``runs.single.track_single_run("svm", ...)`` with the
   same parameters as the study's trials), each with its own empty cache folder and a cleared
   in-process memo: what a hand-written loop without a cache does. Both log to MLflow.
2. ``sweep_fc`` (sweeps/fc_width.yaml): the cost of a trial (fc6/fc7 computed from the cached
   conv output, plus the SVM) against a full extraction (conv + fc for the same images from
   nothing), per fc width.
3. ``sweep_pooling`` (sweeps/pooling.yaml, small budget): the same study (same sampler seed,
   same trials) with the file's median pruner and with no pruner: epochs actually trained,
   against trials x epochs, and the best validation accuracy of both.
4. MLflow overhead of one trial: create_run + one log_batch of 40 metrics + set_terminated,
   against the compute time of a trial.

Usage:
    .venv/bin/python benchmarks/sweep.py [--trials N] [--quick]

The backbone has RANDOM weights (torchvision's seeded initialisation) and the data is
scikit-learn's 8x8 digits upscaled to 32 px: the timings show where time goes, the accuracies
are demo figures of an untrained network, not 15-Scene results.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
IMAGE_SIZE = 32

# The package itself is imported by _common (src/ put on the path when it is not installed); its
# modules are imported after the stores are redirected, see ``isolate``.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import digits_subset, flops_per_image, load_average, median, objective_overhead  # noqa: E402
from _common import table as _table  # noqa: E402


# --------------------------------------------------------------------------------------------
# Isolation and instrumentation
# --------------------------------------------------------------------------------------------

def isolate(tmp: Path) -> str:
    """Point MLflow at a SQLite file in ``tmp`` before any scenesweep module that tracks is imported.

    ``scenesweep.tracking.mlflow_store`` reads MLFLOW_TRACKING_URI when it sets up tracking, and falls back to
    the project's ``mlruns/``: setting it first keeps every run of this benchmark out of there.
    MLFLOW_RUN_ID and friends are dropped so that a launch from ``mlflow run`` does not attach
    the benchmark's runs to the launcher's run.

    Returns:
        The Optuna storage URL (a SQLite file beside the MLflow one).
    """
    store = tmp / "store"
    store.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("SCENESWEEP_OFFLINE", "1")  # random weights: nothing to download
    os.environ["TQDM_DISABLE"] = "1"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)
    return f"sqlite:///{(store / 'optuna.db').as_posix()}"


def quiet_libraries() -> None:
    """Keep MLflow's per-run INFO lines (system metrics, model validation) out of the output.

    Called after ``isolate``: mlflow sets its logger's level when it is imported, so it is
    imported here first and the level lowered after.
    """
    import mlflow  # noqa: F401

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@dataclasses.dataclass
class FeatureTiming:
    """Wall time of one ``compute_features`` call, split into the stages that cost.

    Attributes:
        key: cache key of the layer entry it returned (a trial's ``cache_key`` param).
        layer, fc_width, pooling: what was asked for.
        total_s: the whole call (cache reads and writes included).
        build_s: building the backbone (random init of every layer: grows with fc_width).
        conv_s: the convolutional part over every image, image decoding included.
        fc_s: pool5 -> fc6/fc7 from the conv output (``features.layer_from_conv``).
        hit, conv_hit: the layer / conv entry came from the cache.
    """

    layer: str
    fc_width: int
    pooling: str
    key: str = ""
    total_s: float = 0.0
    build_s: float = 0.0
    conv_s: float = 0.0
    fc_s: float = 0.0
    hit: bool = False
    conv_hit: bool = False


class Instrument:
    """Times the stages of every feature computation, in whatever code path calls it.

    scenesweep records per-batch conv timings (warm-up batches left out) but not the wall time
    of the fc layers or of building the backbone, which is what sweep_fc saves or pays: so the
    benchmark wraps those functions while it runs. The wrappers only read the clock.
    """

    def __init__(self) -> None:
        self.records: list[FeatureTiming] = []
        self._current: FeatureTiming | None = None

    def _stage(self, attribute: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self._current is not None:
                    setattr(self._current, attribute,
                            getattr(self._current, attribute) + time.perf_counter() - began)

        return timed

    @contextlib.contextmanager
    def active(self) -> Iterator["Instrument"]:
        """Install the wrappers; restore the originals on exit."""
        from scenesweep.compute import backbone, features, training

        # training imported compute_features by name, so it is patched there; features calls
        # extract_conv / layer_from_conv / backbone.build_backbone through module globals.
        originals = [(training, "compute_features"), (features, "extract_conv"),
                     (features, "layer_from_conv"), (backbone, "build_backbone")]
        saved = [(module, name, getattr(module, name)) for module, name in originals]
        compute = training.compute_features

        def compute_features(config, dataset, progress=True, **kwargs):
            record = FeatureTiming(config.layer, config.fc_width, config.pooling)
            self._current = record
            began = time.perf_counter()
            try:
                result = compute(config, dataset, progress=progress, **kwargs)
            finally:
                self._current = None
                record.total_s = time.perf_counter() - began
            record.key, record.hit, record.conv_hit = result.key, result.hit, result.conv_hit
            self.records.append(record)
            return result

        training.compute_features = compute_features
        features.extract_conv = self._stage("conv_s", features.extract_conv)
        features.layer_from_conv = self._stage("fc_s", features.layer_from_conv)
        backbone.build_backbone = self._stage("build_s", backbone.build_backbone)
        try:
            yield self
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    def since(self, start: int) -> list[FeatureTiming]:
        return self.records[start:]


def match_records(children: list, records: list[FeatureTiming]) -> dict[str, FeatureTiming]:
    """{run id: its feature timing}: trials call compute_features in trial order (n_jobs=1),
    so each child takes the next unused record with its ``cache_key``."""
    matched, used = {}, set()
    for child in children:
        key = child.data.tags.get("cache_key") or child.data.params.get("cache_key")
        for index, record in enumerate(records):
            if index not in used and record.key == key:
                matched[child.info.run_id] = record
                used.add(index)
                break
    return matched


# --------------------------------------------------------------------------------------------
# Helpers: data, runs, tables
# --------------------------------------------------------------------------------------------

def subset_train_per_class(per_class: int) -> int:
    """Training pool per class for a subset: about two thirds, the rest is the test split."""
    return per_class - max(1, per_class // 3)


def child_runs(parent_run_id: str) -> list:
    """The trial runs of a study's parent run, in trial order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000)
    return sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))


def duration_s(run) -> float:
    """End minus start of an MLflow run (create_run .. set_terminated), in seconds."""
    return (run.info.end_time - run.info.start_time) / 1000.0


def load_trials(study_name: str, storage: str) -> list:
    """The study's finished trials (complete, pruned or failed), in number order.

    Enqueued points beyond the trial budget stay WAITING in the storage: they never ran.
    """
    import optuna
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False, states=finished)
    return sorted(trials, key=lambda t: t.number)


def fresh_cache(tmp: Path, name: str) -> Path:
    """An empty cache folder, with the in-process memo of every cache dropped."""
    from scenesweep.compute import feature_cache, features

    feature_cache.forget_memos()  # the memo would otherwise serve arrays across "fresh" caches
    path, number = tmp / "caches" / name, 1
    while path.exists():
        path, number = tmp / "caches" / f"{name}-{number}", number + 1
    path.mkdir(parents=True)
    return path


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def gmacs_per_image(image_size: int, fc_width: int) -> tuple[float, float]:
    """(convolutions, fc6 + fc7) multiply-adds per image, in G, for VGG16 (``_common.flops_per_image``)."""
    conv, fc = flops_per_image(image_size, fc_width=fc_width)
    return conv / 2e9, fc / 2e9


def table(header: list[str], rows: list[list[Any]]) -> str:
    return _table(header, rows, indent="   ")


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Warm-up
# --------------------------------------------------------------------------------------------

def warm_up(tmp: Path, storage: str) -> float:
    """One-time costs that belong to no side of any comparison; returns their seconds.

    The MLflow and Optuna schemas are created on first use (seconds of migrations), and the
    first extraction of a process picks oneDNN kernels: whichever side ran first would pay them.
    """
    from scenesweep.compute import training
    from scenesweep.search import optuna_storage as search
    from scenesweep.tracking import mlflow_store
    from scenesweep.core.config import make_config

    began = time.perf_counter()
    mlflow_store.setup_tracking()
    search.open_storage(storage)
    tiny = digits_subset(tmp, 6)
    config = make_config("svm", {"data": str(tiny), "train_per_class": 4, "image_size": IMAGE_SIZE,
                                 "cache_dir": str(fresh_cache(tmp, "warmup"))})
    training.fit_head(training.prepare(config, progress=False))
    return time.perf_counter() - began


# --------------------------------------------------------------------------------------------
# 1. sweep_svm against single runs
# --------------------------------------------------------------------------------------------

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


def bench_svm(tmp: Path, storage: str, instrument: Instrument, n_trials: int, data: str,
              train_per_class: int | None, image_size: int = IMAGE_SIZE, naive: int | None = None) -> SvmResult:
    """N-trial sweep_svm on a fresh cache against N single runs with the trials' parameters.

    The first single run goes before the sweep and the others after it, so that a change of
    load on a shared machine does not fall on one side only: trial 0 of a fresh study is the
    study's first enqueued point, known before the study runs; later trials are sampled. With
    ``naive`` only that many single runs are timed (each extracts every image from nothing, so
    they cost alike) and the N single runs are their mean times N.
    """
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study
    from scenesweep.runs.single import track_single_run

    overrides: dict[str, Any] = {"data": data, "image_size": image_size}
    if train_per_class is not None:
        overrides["train_per_class"] = train_per_class
    spec = load_study(SWEEPS / "svm_c.yaml", overrides)

    singles: dict[int, tuple[float, float]] = {}  # trial number -> (run s, features s)

    def single(number: int, params: dict) -> None:
        # A hand-written loop without a cache: its own empty folder, nothing memoised.
        values = {**spec.fixed, **params, "cache_dir": str(fresh_cache(tmp, f"svm-single-{number}"))}
        start = len(instrument.records)
        began = time.perf_counter()
        track_single_run("svm", values, progress=False)
        singles[number] = (time.perf_counter() - began, sum(r.total_s for r in instrument.since(start)))

    first_known = bool(spec.enqueue) and set(spec.enqueue[0]) == set(spec.space)
    if first_known:
        single(0, spec.enqueue[0])

    overrides["cache_dir"] = str(fresh_cache(tmp, "svm-sweep"))  # memo cleared too
    spec = load_study(SWEEPS / "svm_c.yaml", overrides)
    start = len(instrument.records)
    began = time.perf_counter()
    # One study per data and size: the digits study and the --scenes one share the storage, and a
    # study refuses to resume under another setting.
    study_name = f"{spec.study}@{Path(data).name}-{image_size}px"
    summary = run_study(spec, storage=storage, study_name=study_name, n_trials=n_trials, progress=False,
                        register=False)
    sweep_s = time.perf_counter() - began
    sweep_records = instrument.since(start)
    children = child_runs(summary.parent_run_id)
    trials = {t.number: t for t in load_trials(study_name, storage)}
    if first_known and trials[0].params != spec.enqueue[0]:
        say(f"   (trial 0 ran {trials[0].params}, not the enqueued {spec.enqueue[0]}: single run 0 repeated)")
        del singles[0]
    for child in children:
        number = int(child.data.tags["trial_number"])
        if number not in singles and (naive is None or len(singles) < naive):
            single(number, trials[number].params)
    ordered = [singles[int(c.data.tags["trial_number"])] for c in children if int(c.data.tags["trial_number"]) in singles]
    if naive is not None:  # the timed ones stand for all N
        ordered = [(statistics.mean(o[0] for o in ordered), statistics.mean(o[1] for o in ordered))] * len(children)
    first = spec.trial_config(trials[int(children[0].data.tags["trial_number"])].params)
    images = len(summary.best.result.prepared.dataset.paths)
    order = ("single run 0 before the sweep, the others after it" if first_known and 0 in singles and len(children) > 1
             else "the sweep first, then the single runs")
    return SvmResult(len(children), images, sweep_s, [o[0] for o in ordered], [duration_s(c) for c in children],
                     sum(r.total_s for r in sweep_records), [o[1] for o in ordered], order, first)


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


# --------------------------------------------------------------------------------------------
# 2. sweep_fc: fc layers from the cached conv output against a full extraction
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FcRow:
    trial: int
    fc_width: int
    C: float
    run_s: float
    timing: FeatureTiming | None
    fit_s: float
    val_acc: float
    full_s: float  # conv + build + fc at this width, from nothing

    @property
    def ratio(self) -> float:
        return self.run_s / self.full_s


@dataclasses.dataclass
class FcResult:
    reference: FeatureTiming
    rows: list[FcRow]
    sweep_s: float
    images: int


def bench_fc(tmp: Path, storage: str, instrument: Instrument, n_trials: int, data: str,
             train_per_class: int) -> FcResult:
    """A full extraction from nothing (relu7, width 4096), then sweep_fc on a cache holding the
    conv output only, so that every trial computes its fc layers (none finds its layer cached)."""
    from scenesweep.compute import feature_cache, features, training
    from scenesweep.core.config import make_config
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study

    common = {"data": data, "train_per_class": train_per_class, "image_size": IMAGE_SIZE}
    reference_cache = fresh_cache(tmp, "fc-reference")
    config = make_config("svm", {**common, "layer": "relu7", "cache_dir": str(reference_cache)})
    start = len(instrument.records)
    prepared = training.prepare(config, progress=False)
    reference = instrument.since(start)[0]

    # Copy only the conv entry (content-keyed, so a copy is as good as a recomputation): the
    # study then starts as it would after sweep_svm, with the conv output on disk.
    sweep_cache = fresh_cache(tmp, "fc-sweep")
    conv_key = prepared.features.conv_key
    for path in feature_cache.FeatureCache(reference_cache / "features").paths(conv_key):
        (sweep_cache / "features").mkdir(exist_ok=True)
        shutil.copy2(path, sweep_cache / "features" / path.name)
    feature_cache.forget_memos()

    spec = load_study(SWEEPS / "fc_width.yaml", {**common, "cache_dir": str(sweep_cache)})
    start = len(instrument.records)
    began = time.perf_counter()
    summary = run_study(spec, storage=storage, n_trials=n_trials, progress=False, register=False)
    sweep_s = time.perf_counter() - began
    children = child_runs(summary.parent_run_id)
    timings = match_records(children, instrument.since(start))
    # A full extraction at width W: the reference's width-independent part (conv, decoding,
    # cache writes) plus this trial's own backbone build and fc layers at W.
    fixed_part = reference.total_s - reference.build_s - reference.fc_s
    rows = []
    for child in children:
        timing = timings.get(child.info.run_id)
        full = fixed_part + (timing.build_s + timing.fc_s if timing else float("nan"))
        rows.append(FcRow(int(child.data.tags["trial_number"]), int(child.data.params["fc_width"]),
                          float(child.data.params["C"]), duration_s(child), timing,
                          child.data.metrics.get("time/train_fit_s", float("nan")),
                          child.data.metrics.get("val/acc", float("nan")), full))
    return FcResult(reference, rows, sweep_s, len(prepared.dataset.paths))


def report_fc(r: FcResult, data_label: str) -> None:
    ref = r.reference
    say(f"2. sweep_fc (sweeps/fc_width.yaml), {plural(len(r.rows), 'trial')}, {data_label} ({r.images} images), {IMAGE_SIZE} px; "
        "the cache holds the conv output (pool5 before VGG's 7x7 adaptive pool) only")
    say(f"   full extraction from nothing (relu7, fc width 4096): {ref.total_s:.1f} s = build {ref.build_s:.1f} + "
        f"conv {ref.conv_s:.1f} + fc6/fc7 {ref.fc_s:.1f} + cache I/O {ref.total_s - ref.build_s - ref.conv_s - ref.fc_s:.1f}")
    rows = []
    for row in r.rows:
        t = row.timing
        rows.append([f"#{row.trial}", row.fc_width, short(row.C), f"{row.run_s:.1f}",
                     f"{t.build_s:.1f}" if t else "?", f"{t.fc_s:.1f}" if t else "?", f"{row.fit_s:.1f}",
                     f"{row.val_acc:.3f}", f"{row.full_s:.1f}", f"{row.ratio:.2f}"])
    say(table(["trial", "fc_width", "C", "trial run s", "build s", "fc layers s", "SVM fit s", "val acc",
               "full extraction s", "trial / full"], rows))
    say("   'trial run s': MLflow start..end of the child run (features from the cached conv output, SVM, logging);")
    say("   'full extraction s': the reference's conv part + this width's build and fc layers, all from nothing.")
    conv_small, fc_base = gmacs_per_image(IMAGE_SIZE, 4096)
    conv_large, _ = gmacs_per_image(224, 4096)
    widest = max(row.fc_width for row in r.rows)
    say(f"   study wall time {r.sweep_s:.1f} s (with set-up and summary). Per image, the convolutions are "
        f"{conv_small:.2f} GMAC at {IMAGE_SIZE} px and fc6+fc7 {fc_base:.2f} GMAC at width 4096, "
        f"{gmacs_per_image(IMAGE_SIZE, widest)[1]:.2f} at {widest}: a wide trial's fc layers, and the random init "
        "of their weights (build), cost more than the convolutions the cache skips, so the saving is small here; "
        f"at 224 px the convolutions are {conv_large:.1f} GMAC per image and dominate.")
    say()


# --------------------------------------------------------------------------------------------
# 3. sweep_pooling with and without its pruner
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PoolingStudy:
    name: str
    pruner: str
    wall_s: float
    trials: list  # optuna FrozenTrial
    mlflow_epochs: dict[int, int]  # trial number -> val/acc steps logged
    trial_runs_s: float  # sum of the trials' MLflow run durations (no study set-up or summary)
    best_value: float | None
    best_trial: int | None


@dataclasses.dataclass
class PoolingResult:
    pruned: PoolingStudy
    unpruned: PoolingStudy
    epochs: int
    prewarm_s: float
    images: int
    classes: int
    val_images: int

    @property
    def epochs_run(self) -> int:
        return sum(len(t.intermediate_values) for t in self.pruned.trials)

    @property
    def epochs_full(self) -> int:
        return len(self.pruned.trials) * self.epochs

    @staticmethod
    def tuning(trials: list) -> list:
        """The tuning trials (the study's own enqueued settings run in full and are never pruned)."""
        return [t for t in trials if "fixed_params" not in t.system_attrs]

    @property
    def tuning_epochs(self) -> tuple[int, int]:
        """Epochs the tuning trials trained: (with the pruner, without it)."""
        return (sum(len(t.intermediate_values) for t in self.tuning(self.pruned.trials)),
                sum(len(t.intermediate_values) for t in self.tuning(self.unpruned.trials)))


def bench_pooling(tmp: Path, storage: str, n_trials: int, epochs: int, data: str, train_per_class: int,
                  cache_dir: Path) -> PoolingResult:
    """The same study twice (same seed, same trials): the file's pruner, then no pruner."""
    from mlflow.tracking import MlflowClient

    from scenesweep.compute import training
    from scenesweep.core.config import POOLINGS, make_config
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study

    overrides = {"data": data, "train_per_class": train_per_class, "image_size": IMAGE_SIZE,
                 "epochs": epochs, "cache_dir": str(cache_dir)}
    # Extract the four poolings first, so that neither study pays for them: the comparison is
    # of training epochs, and the second study would otherwise find everything cached.
    began = time.perf_counter()
    for pooling in POOLINGS:
        config = make_config("mlp", {**overrides, "layer": "pool5", "pooling": pooling})
        prepared = training.prepare(config, progress=False)
    prewarm_s = time.perf_counter() - began

    spec = load_study(SWEEPS / "pooling.yaml", overrides)
    unpruned_spec = dataclasses.replace(spec, pruner={"name": "none"}, study=f"{spec.study}_unpruned")
    client = MlflowClient()
    studies = []
    for one in (spec, unpruned_spec):
        began = time.perf_counter()
        summary = run_study(one, storage=storage, n_trials=n_trials, progress=False, register=False)
        wall = time.perf_counter() - began
        children = child_runs(summary.parent_run_id)
        steps = {int(c.data.tags["trial_number"]): len(client.get_metric_history(c.info.run_id, "val/acc"))
                 for c in children}
        studies.append(PoolingStudy(one.study, one.pruner["name"], wall, load_trials(one.study, storage), steps,
                                    sum(duration_s(c) for c in children), summary.best.value if summary.best else None,
                                    summary.best.number if summary.best else None))
    return PoolingResult(studies[0], studies[1], epochs, prewarm_s, len(prepared.dataset.paths),
                         len(prepared.dataset.classes), len(prepared.split.val))


def report_pooling(r: PoolingResult, data_label: str, pruner: dict) -> None:
    from optuna.trial import TrialState

    p, u = r.pruned, r.unpruned
    pruner_text = ", ".join(f"{k}={v}" for k, v in pruner.items())
    say(f"3. sweep_pooling (sweeps/pooling.yaml), {plural(len(p.trials), 'trial')} x {plural(r.epochs, 'epoch')}, {data_label} "
        f"({r.images} images), {IMAGE_SIZE} px, RANDOM VGG16 weights: demo figures, not 15-Scene ones")
    say(f"   pruner: {pruner_text} against none; the four poolings were extracted first ({r.prewarm_s:.1f} s), "
        "so both studies only train")
    unpruned = {t.number: t for t in u.trials}
    rows, same_params = [], True
    for t in p.trials:
        twin = unpruned.get(t.number)
        same_params &= twin is not None and twin.params == t.params
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else float("nan")
        twin_value = twin.value if twin is not None and twin.value is not None else float("nan")
        rows.append([f"#{t.number}", t.params.get("pooling"), short(t.params.get("lr")),
                     short(t.params.get("dropout")), t.params.get("hidden"),
                     t.state.name.lower(), f"{len(t.intermediate_values)} / {p.mlflow_epochs.get(t.number, '?')}",
                     f"{last:.3f}", f"{len(twin.intermediate_values) if twin else '?'}", f"{twin_value:.3f}"])
    say(table(["trial", "pooling", "lr", "dropout", "hidden", "pruned study", "epochs (optuna / mlflow)",
               "last val acc", "unpruned epochs", "unpruned val acc"], rows))
    consistent = all(len(t.intermediate_values) == p.mlflow_epochs.get(t.number) for t in p.trials)
    pruned_count = sum(t.state == TrialState.PRUNED for t in p.trials)
    unpruned_epochs = sum(len(t.intermediate_values) for t in u.trials)
    say(f"   same parameters in both studies: {'yes' if same_params else 'NO (the sampler saw different values)'}; "
        f"epochs counted by Optuna and by MLflow agree: {'yes' if consistent else 'NO'}")
    say(f"   epochs trained: {r.epochs_run} with the pruner ({plural(pruned_count, 'trial')} pruned) against "
        f"{unpruned_epochs} without (trials x epochs = {r.epochs_full}): ratio {r.epochs_run / r.epochs_full:.2f}")
    with_pruner, without = r.tuning_epochs
    say(f"   the tuning trials alone (the own settings are never pruned): {with_pruner} epochs with the pruner "
        f"against {without} without: ratio {with_pruner / max(1, without):.2f}")
    say(f"   best val acc: {fmt_best(p)} with the pruner, {fmt_best(u)} without")
    say(f"   time: trial runs {p.trial_runs_s:.1f} s against {u.trial_runs_s:.1f} s; study wall time {p.wall_s:.1f} s "
        f"against {u.wall_s:.1f} s (with set-up and the summary's refit of the best trial); the pruned study ran first")
    stopped = [len(t.intermediate_values) for t in p.trials if t.state == TrialState.PRUNED]
    warmup = pruner.get("n_warmup_steps")
    if stopped and warmup is not None and min(stopped) <= warmup:
        say(f"   pruned trials stopped after {min(stopped)} epoch(s) with n_warmup_steps={warmup}: Optuna counts "
            "steps from 0, scenesweep reports epoch numbers from 1, so the warm-up is one epoch shorter than it reads")
    chance = 1.0 / r.classes
    values = [t.intermediate_values[max(t.intermediate_values)] for t in u.trials if t.intermediate_values]
    if values and median(values) <= chance + 0.05:
        say(f"   note: most trials end near chance ({chance:.2f}): the mlp head gets raw pool5 of an untrained network, "
            "whose class signal is a small variation on a large common offset, and learns little in a few epochs; "
            f"with {r.val_images} validation images (1/{r.val_images} each) the pruner's decisions turn on one or two "
            "of them. The figures show the mechanism, not which settings are better.")
    say()


def fmt_best(study: PoolingStudy) -> str:
    if study.best_value is None:
        return "none (no trial completed)"
    return f"{study.best_value:.3f} (trial #{study.best_trial})"


# --------------------------------------------------------------------------------------------
# 4. MLflow overhead of one trial
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoggingResult:
    bare_s: list[float]
    objective_s: list[float]
    epoch_s: list[float]
    svm_compute_s: list[float]
    mlp_trial_s: float
    mlp_epochs: float

    @property
    def svm_ratio(self) -> float:
        return median(self.bare_s) / median(self.svm_compute_s)

    @property
    def mlp_logging_s(self) -> float:
        return median(self.bare_s) + self.mlp_epochs * median(self.epoch_s)


def bench_logging(repeats: int, svm_config, pooling: PoolingResult, storage: str) -> LoggingResult:
    """Child-run logging on the temporary SQLite store, against an SVM trial's compute."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from scenesweep.compute import training
    from scenesweep.tracking import mlflow_store, sink

    client = MlflowClient()
    experiment = mlflow_store.experiment_id("benchmark_logging")
    parent = client.create_run(experiment, run_name="parent").info.run_id

    # The compute of a sweep_svm trial from the cache (features memoised, as in a study).
    compute = []
    for _ in range(3):
        began = time.perf_counter()
        training.fit_head(training.prepare(svm_config, progress=False), svm_config)
        compute.append(time.perf_counter() - began)

    bare, epoch = [], []
    for number in range(repeats):
        # What the brief calls one trial's logging: create, one batch of 40 metrics, terminate.
        began = time.perf_counter()
        run_id = client.create_run(experiment, run_name=f"bare #{number}",
                                   tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"metric_{i:02d}", float(i), now, 0) for i in range(40)])
        client.set_terminated(run_id, "FINISHED")
        bare.append(time.perf_counter() - began)

        # One epoch of an mlp trial: sink.epoch_logger's log_batch of 4 metrics.
        began = time.perf_counter()
        sink.log_batch(run_id, metrics={"train/loss": 1.0, "train/acc": 0.5, "val/loss": 1.0, "val/acc": 0.5},
                           step=number + 1)
        epoch.append(time.perf_counter() - began)
    # The real runs.objective.Objective on the same trial, beyond the trial's compute.
    measured = objective_overhead(mlflow.get_tracking_uri(), storage, dict(svm_config.values), repeats)
    objective = [t - c for t, c in zip(measured["trial_s"], measured["compute_s"])]

    # An mlp trial of section 3, unpruned study: MLflow duration and epochs.
    durations, epochs = [], []
    for trial in pooling.unpruned.trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            run = client.get_run(run_id)
            if run.info.end_time:
                durations.append(duration_s(run))
                epochs.append(len(trial.intermediate_values))
    return LoggingResult(bare, objective, epoch, compute, median(durations), median(epochs))


def report_logging(r: LoggingResult, repeats: int) -> None:
    svm = median(r.svm_compute_s)
    say(f"4. MLflow logging of one trial's child run, temporary SQLite store, median of {repeats}")
    say(table(["what", "ms", "/ SVM trial compute"], [
        ["create_run + log_batch(40 metrics) + set_terminated", f"{median(r.bare_s) * 1e3:.0f}",
         f"{median(r.bare_s) / svm:.3f}"],
        ["the real runs.objective.Objective on an SVM trial, beyond its compute",
         f"{median(r.objective_s) * 1e3:.0f}", f"{median(r.objective_s) / svm:.3f}"],
        ["one epoch's log_batch (4 metrics, mlp trials)", f"{median(r.epoch_s) * 1e3:.0f}",
         f"{median(r.epoch_s) / svm:.3f}"]]))
    say(f"   SVM trial compute (prepare from the cache + fit_head, section 1's first trial): median {svm:.2f} s "
        f"of {len(r.svm_compute_s)}")
    if r.mlp_trial_s == r.mlp_trial_s:  # not NaN
        say(f"   mlp trial (section 3, unpruned, median): {r.mlp_trial_s:.1f} s for {r.mlp_epochs:.0f} epochs; "
            f"its logging ~{r.mlp_logging_s * 1e3:.0f} ms = {r.mlp_logging_s / r.mlp_trial_s:.3f} of it")
    say()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None,
                        help="sweep_svm trials, and single runs to compare with (default 3, 2 with --quick)")
    parser.add_argument("--fc-trials", type=int, default=None,
                        help="sweep_fc trials; the first three are the study's own widths 8196, 16384, 4096 "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--pooling-trials", type=int, default=None,
                        help="sweep_pooling trials; the first four are never pruned (n_startup_trials) "
                             "(default 8, 5 with --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="sweep_pooling epochs per trial; the file's pruner (n_warmup_steps=3) can stop a "
                             "trial at epoch 3 or later, since epochs are reported from 1 (default 5, 4 with --quick)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="digits per class for section 2 (and 1 with --quick; section 1 uses all 1797 "
                             "digits otherwise); fc-layer costs grow with it, the backbone build does not "
                             "(default 20, 12 with --quick)")
    parser.add_argument("--pooling-per-class", type=int, default=None,
                        help="digits per class for section 3: an mlp step on pool5 (25088 inputs) costs about "
                             "the same for any batch, so this sets the batches per epoch (default 12)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats of the logging measurement (default 10, 5 with --quick)")
    parser.add_argument("--scenes", default=None, metavar="DIR",
                        help="also: a 50-trial sweep_svm at 224 px on this folder (benchmarks/make_scenes.py) "
                             "against 50 naive single runs (--naive-runs of them timed)")
    parser.add_argument("--scenes-trials", type=int, default=50, help="trials of the --scenes sweep")
    parser.add_argument("--naive-runs", type=int, default=2, help="single runs timed for the --scenes ratio")
    parser.add_argument("--quick", action="store_true", help="smoke test, under about two minutes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores and caches (prints where)")
    args = parser.parse_args(argv)
    defaults = {"trials": (3, 2), "fc_trials": (3, 1), "pooling_trials": (8, 5), "epochs": (5, 4),
                "per_class": (20, 12), "pooling_per_class": (12, 12), "repeats": (10, 5)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.trials, args.fc_trials, args.pooling_trials, args.epochs, args.repeats) < 1:
        parser.error("trial, epoch and repeat counts must be at least 1")
    for name in ("per_class", "pooling_per_class"):
        if not 8 <= getattr(args, name) <= 170:
            parser.error(f"--{name.replace('_', '-')} must be between 8 and 170 (smaller leaves a class "
                         "without a validation image; the smallest digit class has 174 images)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="scenesweep-sweep-bench-"))
    started = time.perf_counter()
    try:
        storage = isolate(tmp)
        quiet_libraries()
        import torch

        from scenesweep.compute import features, hardware

        say(f"scenesweep sweep benchmark{' (--quick)' if args.quick else ''}: temporary stores and caches in {tmp}")
        say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
            f"{hardware.resolve_device('auto')}, extraction precision "
            f"auto (measured per machine and shape; see each run's precision_reason); load average {load_average()}")
        say("Data: scikit-learn digits (8x8, upscaled) at 32 px with RANDOM VGG16 weights: timings show where time "
            "goes; accuracies are demo figures of an untrained network, not 15-Scene results.")
        say("Other processes on the machine add noise: compare only numbers from one run.\n")
        say(f"warm-up (MLflow/Optuna schemas, first extraction; not counted): {warm_up(tmp, storage):.1f} s\n")

        subset = digits_subset(tmp, args.per_class)
        subset_tpc = subset_train_per_class(args.per_class)
        subset_label = f"digits subset, {args.per_class} per class ({subset_tpc} to train+val)"
        instrument = Instrument()
        with instrument.active():
            if args.quick:
                svm = bench_svm(tmp, storage, instrument, args.trials, str(subset), subset_tpc)
                report_svm(svm, subset_label)
            else:
                svm = bench_svm(tmp, storage, instrument, args.trials, "digits", None)
                report_svm(svm, "all of digits (100 per class to train+val)")

            if args.scenes:
                scenes = bench_svm(tmp, storage, instrument, args.scenes_trials, str(Path(args.scenes).resolve()),
                                   None, image_size=224, naive=args.naive_runs)
                report_svm(scenes, f"{args.scenes} at 224 px ({args.naive_runs} naive runs timed, x"
                                   f"{scenes.n / max(1, args.naive_runs):.0f})")
                say(f"   -> {scenes.n}-trial sweep_svm against {scenes.n} naive runs at 224 px: {scenes.ratio:.1f}x\n")

            fc = bench_fc(tmp, storage, instrument, args.fc_trials, str(subset), subset_tpc)
            report_fc(fc, subset_label)

            from scenesweep.specs.studies import load_study

            small = digits_subset(tmp, args.pooling_per_class)
            small_tpc = subset_train_per_class(args.pooling_per_class)
            pooling = bench_pooling(tmp, storage, args.pooling_trials, args.epochs, str(small), small_tpc,
                                    fresh_cache(tmp, "pooling"))
            report_pooling(pooling, f"digits subset, {args.pooling_per_class} per class ({small_tpc} to train+val)",
                           load_study(SWEEPS / "pooling.yaml").pruner)

            logging_result = bench_logging(args.repeats, svm.trial_config, pooling, storage)
            report_logging(logging_result, args.repeats)

        fc_ratios = [row.ratio for row in fc.rows if row.ratio == row.ratio] or [float("nan")]
        say(f"Load average at end: {load_average()}; {time.perf_counter() - started:.0f} s in all")
        say(f"ratios: sweep_svm single runs x{svm.n} / sweep = {svm.ratio:.2f}x; "
            f"sweep_fc trial / full extraction = {median(fc_ratios):.2f} (median over {plural(len(fc.rows), 'width')}, "
            f"{min(fc_ratios):.2f}..{max(fc_ratios):.2f}); "
            f"sweep_pooling epochs pruned / unpruned = {pooling.epochs_run}/{pooling.epochs_full} = "
            f"{pooling.epochs_run / pooling.epochs_full:.2f}, tuning trials "
            f"{pooling.tuning_epochs[0]}/{pooling.tuning_epochs[1]} = "
            f"{pooling.tuning_epochs[0] / max(1, pooling.tuning_epochs[1]):.2f} "
            f"(best val acc {fmt_value(pooling.pruned.best_value)} "
            f"vs {fmt_value(pooling.unpruned.best_value)}); "
            f"MLflow logging / SVM trial compute = {logging_result.svm_ratio:.3f}")
        return 0
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        # Interpreter shutdown collects garbage over the whole heap of torch, MLflow and Optuna
        # objects, several times: seconds on a loaded machine, after everything is measured.
        # Freezing the heap leaves it to be freed without those collections.
        gc.freeze()


def fmt_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
