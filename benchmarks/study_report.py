"""The study benchmark's report: the per-stage table with each stage's floor, the head-step
and extraction tables against their ceilings, the totals against the reference report's
per-batch figures and the floor, and study.json.

Part of ``benchmarks/study.py``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py, the other study_*.py modules
from _common import table  # noqa: E402
from study_floor import StageFloor  # noqa: E402
from study_reading import WorkRun, split_sizes  # noqa: E402
from study_runs import Stage  # noqa: E402
from study_setup import Setup  # noqa: E402

# The reference report's per-batch figures (STUDY.md, pooling table, max pooling): seconds per
# mini-batch of 8 images, to extract (its "test" column) and to train (its "train" column).
REFERENCE_BATCH = 8
REFERENCE_EXTRACT_S_PER_BATCH = 2.6
REFERENCE_TRAIN_S_PER_BATCH = 5.15


def show_load(load: list[float] | None) -> str:
    return "n/a" if load is None else f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"


def fmt(value: Any, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def machine_details(device: str) -> dict[str, str]:
    from scenesweep.compute import hardware

    return hardware.machine_facts(device)


@dataclass
class Measured:
    """What the stages ran and cost: their work runs, each stage's floor, the whole wall time."""

    ran: list[Stage]
    work: list[WorkRun]
    floors: dict[str, StageFloor]
    device: Any
    study_wall_s: float


def reference_same_work(w: WorkRun) -> float:
    """Seconds the reference report's per-batch figures give for the work of ``w``."""
    batch = w.head_key[1] if w.head_key else REFERENCE_BATCH
    image_passes = (w.steps + w.refit_steps) * batch
    return (w.images_extracted * w.branches * REFERENCE_EXTRACT_S_PER_BATCH
            + image_passes * REFERENCE_TRAIN_S_PER_BATCH) / REFERENCE_BATCH


TOTALLED = ("wall_s", "floor_s", "floor_extract_s", "floor_head_s", "images_extracted", "epochs", "head_steps",
            "refit_steps", "cache_bytes_added", "reference_same_work_s", "own_setting_runs_s",
            "own_setting_floor_s", "cpu_s")


def print_stage_table(setup: Setup, measured: Measured) -> dict:
    """One row per stage, its floor set beside it (stored in its result); the totals."""
    rows, totals = [], defaultdict(float)
    for stage in measured.ran:
        r = stage.result
        sw = [w for w in measured.work if w.stage == stage.name]
        floor_of = measured.floors[stage.name]
        r["floor_extract_s"] = sum(floor_of.extract_s(w) for w in sw)
        r["floor_head_s"] = sum(floor_of.head_s(w, w.steps + w.refit_steps) for w in sw)
        r["floor_s"] = r["floor_extract_s"] + r["floor_head_s"]
        r["own_setting_floor_s"] = sum(floor_of.extract_s(w) + floor_of.head_s(w, w.steps) for w in sw if w.own_setting)
        r["floor"] = floor_of.as_dict()
        r["reference_same_work_s"] = sum(reference_same_work(w) for w in sw)
        for key in TOTALLED:
            totals[key] += r[key]
        totals["peak_rss_bytes"] = max(totals["peak_rss_bytes"], r["peak_rss_bytes"])
        rows.append(stage_row(stage))
    print(f"\nThe study, {len(measured.ran)} experiments, data {setup.data} ({setup.weights} weights), "
          f"device {measured.device}:")
    print(table(["stage", "images", "trials (C/P/F)", "epochs", "head steps (+refit)", "wall s",
                 "extract img/s", "floor s", "wall/floor", "peak RSS GiB", "cache MB", "val / test acc",
                 "status"], rows))
    print("   images: images whose convolutions ran, once per pooling type (a cache hit extracts nothing; a "
          "pooling study's one pass for several poolings counts each); trials: complete / pruned / "
          "failed; epochs and head steps: trained by runs and trials, '+N': steps of the refits that compute "
          "test accuracy; extract img/s: the extractor's own logged time/extract_images_per_s (a shared pass: "
          "images through all its poolings per second); floor: those images at the summed conv-layer ceiling "
          "(a shared pass: block 1 once, the rest per pooling) plus every head step at the head's summed-op "
          "ceiling (each GEMM of a step and the Adam update timed alone, best, summed); val: the "
          "best trial's (or the run's). SVM fits, fc layers of new widths, process start-up, evaluation and "
          "logging are outside the floor.")
    return totals


def stage_row(stage: Stage) -> list[str]:
    r = stage.result
    trials = r["trials"]
    finished = {k: v for k, v in trials.items() if k in ("COMPLETE", "PRUNED", "FAIL")}
    trial_text = (f"{sum(finished.values())} ({trials.get('COMPLETE', 0)}/{trials.get('PRUNED', 0)}/"
                  f"{trials.get('FAIL', 0)})" if trials else "-")
    if trials.get("WAITING"):
        trial_text += f" +{trials['WAITING']} queued"
    ips = r["extract_images_per_s"]
    acc = r["accuracy"]
    val = acc.get("best/val/acc", acc.get("val/acc"))
    return [stage.name, str(r["images_extracted"] or "-"), trial_text, str(r["epochs"] or "-"),
            (str(r["head_steps"]) + (f" +{r['refit_steps']}" if r["refit_steps"] else "")
             if r["head_steps"] else "-"), f"{r['wall_s']:.1f}", fmt(statistics.mean(ips) if ips else None),
            f"{r['floor_s']:.1f}", fmt(r["wall_s"] / r["floor_s"] if r["floor_s"] else None, ".2f"),
            f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['cache_bytes_added'] / 1e6:.1f}",
            fmt(val, ".3f") + " / " + fmt(acc.get("test/acc"), ".3f"),
            "ok" if r["rc"] == 0 else f"exit {r['rc']}"]


def print_floor_tables(measured: Measured) -> None:
    """The head steps against the bare loop's, and extraction against the conv-layer ceiling."""
    head_rows, ceiling_rows = [], []
    for stage in measured.ran:
        floor_of = measured.floors[stage.name]
        mine = [w for w in measured.work if w.stage == stage.name]
        for (widths, batch_size), step in floor_of.heads.items():
            same = [w for w in mine if w.head_key == (widths, batch_size)]
            logged = [w.logged_step_s for w in same if w.logged_step_s]
            median_logged = statistics.median(logged) if logged else None
            head_rows.append([stage.name, "-".join(map(str, widths)), str(batch_size),
                              str(sum(w.steps + w.refit_steps for w in same)), f"{step.floor_s * 1e3:.1f}",
                              f"{step.min_s * 1e3:.1f}",
                              f"{step.median_s * 1e3:.1f}", fmt(median_logged * 1e3 if median_logged else None),
                              fmt(median_logged / step.floor_s if median_logged else None, ".2f"),
                              fmt(median_logged / step.median_s if median_logged else None, ".2f")])
        for key, ceiling in floor_of.ceilings.items():
            passes = [w for w in mine if w.extract_key == key and w.extract_images_per_s]
            for branches in sorted({w.branches for w in passes} or {1}):
                same = [w for w in passes if w.branches == branches]
                mean_ips = statistics.mean(w.extract_images_per_s for w in same) if same else None
                # A shared pass of b pooling types: its own ceiling (block 1 once, the rest b times).
                pass_ceiling = (same[0].images_extracted / floor_of.extract_s(same[0]) if same
                                else ceiling.images_per_s)
                setting = f"{key[0]} {key[1]} px, batch {key[2]}, {ceiling.precision}" + \
                    (f", one pass for {branches} poolings" if branches > 1 else "")
                ceiling_rows.append([stage.name, setting, f"{ceiling.seconds_per_batch * 1e3:.1f}",
                                     f"{pass_ceiling:.1f}", fmt(mean_ips),
                                     fmt(mean_ips / pass_ceiling if mean_ips else None, ".2f"),
                                     fmt(floor_of.load[0] if floor_of.load else None, ".2f")])
    if head_rows:
        print("\nHead steps against the summed-op ceiling and the bare PyTorch loop (same head and batch, Adam fused; "
              "measured after each stage):")
        print(table(["stage", "head", "batch", "steps run", "summed-op ceiling ms (floor)", "bare best ms",
                     "bare median ms", "logged median ms", "logged / floor", "logged / bare median"], head_rows))
    if ceiling_rows:
        print("\nExtraction against the summed conv-layer ceiling (each conv layer alone; measured after each stage):")
        print(table(["stage", "setting", "ceiling ms/batch (one pooling)", "ceiling img/s (this pass)",
                     "extractor img/s (logged)", "extractor / ceiling", "load"], ceiling_rows))


def print_totals(setup: Setup, measured: Measured, totals: dict) -> float:
    """The whole study against the reference report's figures and the floor; returns the
    reference's cost of every run from scratch, as the report did."""
    reference = totals["reference_same_work_s"]
    wall = totals["wall_s"]
    dataset_images = split_sizes(str(setup.data), 0, 0.0)["n_images"]
    naive_s = 0.0
    for w in measured.work:
        batch = w.head_key[1] if w.head_key else REFERENCE_BATCH
        naive_s += (dataset_images * REFERENCE_EXTRACT_S_PER_BATCH
                    + (w.steps + w.refit_steps) * batch * REFERENCE_TRAIN_S_PER_BATCH) / REFERENCE_BATCH
    floor_s = totals["floor_s"]
    print(f"\nTotal: {wall:.0f} s of experiments ({measured.study_wall_s:.0f} s with reading the stores and "
          f"measuring the floor after each), "
          f"{totals['cpu_s']:.0f} CPU s, {int(totals['images_extracted'])} images extracted, "
          f"{int(totals['epochs'])} epochs, {int(totals['head_steps'])} head steps "
          f"(+{int(totals['refit_steps'])} in refits), peak RSS {totals['peak_rss_bytes'] / 2**30:.2f} GiB, "
          f"cache {totals['cache_bytes_added'] / 1e9:.2f} GB")
    if wall:
        print(f"Reference report's per-batch figures for the same work ({REFERENCE_EXTRACT_S_PER_BATCH} s per batch "
              f"of {REFERENCE_BATCH} extracted, {REFERENCE_TRAIN_S_PER_BATCH} s per batch of {REFERENCE_BATCH} "
              f"trained): {reference:.0f} s = {reference / 3600:.1f} h: ours is {reference / wall:.1f}x faster")
        print(f"   (and with every run from scratch, as the report did: {naive_s:.0f} s = {naive_s / 3600:.1f} h, "
              f"{naive_s / wall:.1f}x)")
    if floor_s:
        print(f"Floor measured in this run: {floor_s:.0f} s (extraction {totals['floor_extract_s']:.0f} s at the "
              f"summed conv-layer ceiling, head steps {totals['floor_head_s']:.0f} s at the summed-op ceiling): "
              f"study / floor = {wall / floor_s:.2f}")
    if totals["own_setting_floor_s"]:
        print(f"The study's own settings (single runs and enqueued trials, their MLflow run durations): "
              f"{totals['own_setting_runs_s']:.0f} s against a floor of {totals['own_setting_floor_s']:.0f} s: "
              f"{totals['own_setting_runs_s'] / totals['own_setting_floor_s']:.2f}x")
    return naive_s


def write_report(setup: Setup, measured: Measured, totals: dict, naive_s: float, load_end, extra: list[str]) -> None:
    """study.json in --out, when given: every stage, every work run, the totals."""
    if not setup.out:
        return
    wall, floor_s = totals["wall_s"], totals["floor_s"]
    report = {
        "command": setup.command_line, "started": setup.started_at, "load_average_start": setup.load_start,
        "load_average_end": load_end, "machine": machine_details(str(measured.device)),
        "data": str(setup.data), "weights": setup.weights, "extra_args": extra,
        "stages": [{"name": s.name, "command": s.command, "dropped_options": s.dropped, **s.result}
                   for s in measured.ran],
        "work_runs": [w.__dict__ for w in measured.work],
        "totals": {**totals, "study_wall_s": measured.study_wall_s, "reference_naive_s": naive_s,
                   "study_over_floor": wall / floor_s if floor_s else None,
                   "reference_over_study": totals["reference_same_work_s"] / wall if wall else None},
        "reference": {"batch": REFERENCE_BATCH, "extract_s_per_batch": REFERENCE_EXTRACT_S_PER_BATCH,
                      "train_s_per_batch": REFERENCE_TRAIN_S_PER_BATCH},
    }
    setup.out.mkdir(parents=True, exist_ok=True)
    (setup.out / "study.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"written: {setup.out / 'study.json'} (logs in {setup.logs})")
