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
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The package itself is imported by _common (src/ put on the path when it is not installed); its
# modules are imported after the stores are redirected, see ``isolate``. The sections live in
# the sweep_*.py modules beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import digits_subset, load_average, median  # noqa: E402
from sweep_fc import FcResult, bench_fc, report_fc  # noqa: E402
from sweep_common import (SWEEPS, fresh_cache, isolate, plural, quiet_libraries, say,  # noqa: E402
                           subset_train_per_class, warm_up)
from sweep_instrument import Instrument  # noqa: E402
from sweep_logging import LoggingResult, bench_logging, report_logging  # noqa: E402
from sweep_pooling import PoolingResult, bench_pooling, report_pooling  # noqa: E402
from sweep_svm import SvmResult, bench_svm, report_svm  # noqa: E402


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
        say_preamble(args, tmp, storage)
        instrument = Instrument()
        with instrument.active():
            svm, fc = run_cache_sections(args, tmp, storage, instrument)
            pooling, logging_result = run_training_sections(args, tmp, storage, svm)
        say_ratios(svm, fc, pooling, logging_result, started)
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


def say_preamble(args: argparse.Namespace, tmp: Path, storage: str) -> None:
    """The run's set-up (versions, threads, device, load), then the warm-up, timed."""
    import torch

    from scenesweep.compute import hardware

    say(f"scenesweep sweep benchmark{' (--quick)' if args.quick else ''}: temporary stores and caches in {tmp}")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{hardware.resolve_device('auto')}, extraction precision "
        f"auto (measured per machine and shape; see each run's precision_reason); load average {load_average()}")
    say("Data: scikit-learn digits (8x8, upscaled) at 32 px with RANDOM VGG16 weights: timings show where time "
        "goes; accuracies are demo figures of an untrained network, not 15-Scene results.")
    say("Other processes on the machine add noise: compare only numbers from one run.\n")
    say(f"warm-up (MLflow/Optuna schemas, first extraction; not counted): {warm_up(tmp, storage):.1f} s\n")


def run_cache_sections(args: argparse.Namespace, tmp: Path, storage: str,
                       instrument: Instrument) -> tuple[SvmResult, FcResult]:
    """Sections 1 (sweep_svm against single runs; the --scenes one too) and 2 (sweep_fc)."""
    subset = digits_subset(tmp, args.per_class)
    subset_tpc = subset_train_per_class(args.per_class)
    subset_label = f"digits subset, {args.per_class} per class ({subset_tpc} to train+val)"
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
    return svm, fc


def run_training_sections(args: argparse.Namespace, tmp: Path, storage: str,
                          svm: SvmResult) -> tuple[PoolingResult, LoggingResult]:
    """Sections 3 (sweep_pooling with and without its pruner) and 4 (MLflow logging of a trial)."""
    from scenesweep.specs.studies import load_study

    small = digits_subset(tmp, args.pooling_per_class)
    small_tpc = subset_train_per_class(args.pooling_per_class)
    pooling = bench_pooling(tmp, storage, args.pooling_trials, args.epochs, str(small), small_tpc,
                            fresh_cache(tmp, "pooling"))
    report_pooling(pooling, f"digits subset, {args.pooling_per_class} per class ({small_tpc} to train+val)",
                   load_study(SWEEPS / "pooling.yaml").pruner)

    logging_result = bench_logging(args.repeats, svm.trial_config, pooling, storage)
    report_logging(logging_result, args.repeats)
    return pooling, logging_result


def say_ratios(svm: SvmResult, fc: FcResult, pooling: PoolingResult, logging_result: LoggingResult,
               started: float) -> None:
    """The closing lines: load, total time and the ratio of every section."""
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


def fmt_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
