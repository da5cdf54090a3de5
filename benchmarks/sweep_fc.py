"""Section 2 of benchmarks/sweep.py: sweep_fc (sweeps/fc_width.yaml) trials, which compute their
fc layers from the cached conv output, against a full extraction from nothing, per fc width.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, the other sweep_*.py modules
from sweep_common import (IMAGE_SIZE, SWEEPS, child_runs, duration_s, fresh_cache, gmacs_per_image,  # noqa: E402
                           plural, say, short, table)
from sweep_instrument import FeatureTiming, Instrument, match_records  # noqa: E402


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
    from scenesweep.compute import feature_cache, training
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

