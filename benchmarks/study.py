"""Run the whole reference study as a user would, and set its cost beside this machine's floor.

Every experiment file in ``experiments/`` (or the chosen ones) runs through the real command
line, one after the other, each as its own process:

    scenesweep run experiments/<file>.yaml --data DIR [--weights random] --device D --cache_dir C [ARGS]

against a temporary MLflow store (``MLFLOW_TRACKING_URI=sqlite:////<tmp>/store/mlflow.db``), the
Optuna storage beside it and a temporary feature cache shared by the experiments (so, as in
``make study``, the convolutions run once per pooling type). ImageNet weights are used when
torchvision's cache holds them, random weights otherwise. Each process's peak RSS is measured
(psutil polling its process tree, and the kernel's ru_maxrss from wait4).

Then it reads the stores (MlflowClient, optuna) and prints, per experiment (stage): images
extracted, trials (complete / pruned / failed), epochs and head steps trained (with the refits
that compute test accuracy), wall seconds, the extractor's logged images/s, peak RSS and cache
bytes added; the head steps against the bare loop's; then the total, and its ratio to

* the reference report's per-batch figures (2.6 s per mini-batch of 8 to extract, 5.15 s per
  batch of 8 to train) for the same work: every image extracted at 2.6 s / 8 and every training
  image pass at 5.15 s / 8 (and, for scale, every run from scratch, as the report did);
* the study's floor, measured in the same run with ``benchmarks/floor.py`` (right after each
  experiment, for what it ran, so under the same load): every image pass that ran at the summed
  conv-layer ceiling of its image size, batch and precision, plus every head step that ran at the
  bare PyTorch loop's best step time for that head and batch (under the runs' own process
  settings: a floor no run can beat, see floor.py).

The study's own settings (the study files' enqueued trials and the single runs) are also set
beside their floor alone, apart from the tuning trials.

Usage:
    .venv/bin/python benchmarks/study.py --data DIR [--out FOLDER] [--experiments q8,q12_2,...]
        [--device auto|cpu|cuda] [--weights auto|imagenet|random] [--keep] [--dry-run] [-- ARGS...]

ARGS after ``--`` go to every ``scenesweep run`` (e.g. ``-- --image_size 64 --n_trials 2
--epochs 2 --train_per_class 4`` for a smoke test); an option that an experiment does not take
(``--epochs`` for Q1) is dropped for that experiment, as its ``--check`` says. Every experiment is
checked (``--check``) before anything runs. It talks to the command line and the stores only, not
to the package's internals, so that it keeps measuring what a user gets.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/floor.py, _common.py
from _common import load_numbers, machine_line  # noqa: E402
# The parts of the benchmark, one module each: the processes (study_runs), their shared setup
# (study_setup), reading the stores (study_reading), the floor (study_floor), the report (study_report).
from study_floor import StageFloor, measure_floor  # noqa: E402
from study_reading import WorkRun, all_runs, all_trials, optuna_storage_url, read_stage  # noqa: E402
from study_report import (Measured, fmt, print_floor_tables, print_stage_table, print_totals,  # noqa: E402
                          show_load, write_report)
from study_runs import folder_bytes, log_tail, run_measured, split_options  # noqa: E402
from study_setup import (Setup, checked_stages, chosen_weights,  # noqa: E402
                         select_experiments, stage_environment)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --data DIR [options] [-- ARGS for every scenesweep run]")
    parser.add_argument("--data", required=True, type=Path, help="a 15-Scene folder (or benchmarks/make_scenes.py's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for study.json and the experiments' logs")
    parser.add_argument("--experiments", default=None,
                        help="comma-separated file stems or prefixes (q8,q12_2,...); default: all of experiments/")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="passed to every run; the floor is measured on it (default: auto)")
    parser.add_argument("--weights", default="auto", choices=("auto", "imagenet", "random"),
                        help="auto (default): imagenet when torchvision's cache holds VGG16's checkpoint, else random")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary stores and cache go (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and cache after the run")
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds; stops an experiment after it")
    parser.add_argument("--floor-repeats", type=int, default=5, help="repeats per conv layer for the ceiling, at the least (default: 5)")
    parser.add_argument("--floor-steps", type=int, default=20, help="timed steps of each bare head loop (default: 20)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the commands; run nothing")
    args = parser.parse_args(argv)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scenesweep-study-")).resolve()
    try:
        return benchmark_the_study(args, extra, workdir, argv)
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark_the_study(args: argparse.Namespace, extra: list[str], workdir: Path, argv: list[str] | None) -> int:
    """Check, run and measure the experiments, measure the floor, print and write the report."""
    setup = set_up(args, extra, workdir, argv)
    if isinstance(setup, int):
        return setup
    if args.dry_run:
        for stage in setup.stages:
            print(f"--check {stage.name}: {stage.check_output}")
        return 0
    measured = run_stages(setup, args)
    totals = print_stage_table(setup, measured)
    print_floor_tables(measured)
    naive_s = print_totals(setup, measured, totals)
    load_end = load_numbers()
    print(f"load average at end: {show_load(load_end)}")
    write_report(setup, measured, totals, naive_s, load_end, extra)
    return 0 if all(s.result.get("rc") == 0 for s in setup.stages) else 1


def set_up(args: argparse.Namespace, extra: list[str], workdir: Path, argv: list[str] | None) -> Setup | int:
    """Print the header and check every stage's command; an exit status when something is wrong."""
    command_line = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in [sys.executable, __file__, *argv])
    data = args.data.expanduser().resolve()
    if not data.is_dir():
        print(f"error: --data {args.data}: folder not found", file=sys.stderr)
        return 2
    try:
        files = select_experiments(args.experiments)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_start = load_numbers()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print(f"scenesweep study benchmark, {started_at}")
    print(f"command: {command_line}")
    print(f"machine: {machine_line(args.device)}; python {platform.python_version()}")
    print(f"load average at start: {show_load(load_start)}")
    weights = chosen_weights(args.weights)
    store, cache = workdir / "store", workdir / "cache"
    store.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve() if args.out else None
    logs = (out or workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = stage_environment(store)
    print(f"stores: {env['MLFLOW_TRACKING_URI']} (Optuna beside it); cache: {cache}; logs: {logs}")
    fixed = ["--data", str(data), "--device", args.device, "--cache_dir", str(cache), "--no-progress"]
    if weights == "random":
        fixed += ["--weights", "random"]
    stages = checked_stages(files, split_options(fixed) + split_options(extra), env)
    if stages is None:
        return 2
    return Setup(command_line, started_at, load_start, data, weights, stages, env, store, cache, logs, out)


def run_stages(setup: Setup, args: argparse.Namespace) -> Measured:
    """Each stage as its own process, then its runs and trials read from the stores and the floor
    of what it ran measured right after it (under the same load). Ctrl-C reports what ran."""
    import logging

    from mlflow.tracking import MlflowClient

    import floor

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # this process only reads the stores
    client = MlflowClient()
    device = floor.resolve_device(args.device)
    floors: dict[str, StageFloor] = {}
    default_storage = f"sqlite:///{(setup.store / 'optuna.db').as_posix()}"
    # A reused --workdir (--keep, then other --experiments on the same cache): what is already in
    # its stores belongs to earlier invocations, not to this one's first stage.
    seen_runs: set[str] = set(all_runs(client))
    seen_trials: set[tuple[str, int]] = set(all_trials(default_storage))
    work: list[WorkRun] = []
    began_all = time.perf_counter()
    try:
        for number, stage in enumerate(setup.stages, 1):
            load = load_numbers()
            print(f"[{number}/{len(setup.stages)}] {stage.name} (load {fmt(load[0] if load else None, '.2f')}) ...",
                  end="", flush=True)
            cache_before = folder_bytes(setup.cache)
            measured = run_measured(stage.command, setup.env, setup.logs / f"{stage.name}.log", args.stage_timeout)
            measured.update({"cache_bytes_added": folder_bytes(setup.cache) - cache_before, "load_at_start": load})
            runs = all_runs(client)
            new_runs = [r for rid, r in runs.items() if rid not in seen_runs]
            seen_runs.update(runs)
            trials = all_trials(optuna_storage_url(runs, default_storage))
            new_trials = [t for key, t in trials.items() if key not in seen_trials]
            seen_trials.update(trials)
            stage_work = read_stage(stage, measured, new_runs, new_trials, client, setup)
            work += stage_work
            floors[stage.name] = measure_floor(stage_work, device, args.floor_repeats, args.floor_steps)
            status = "ok" if measured["rc"] == 0 else f"FAILED (exit {measured['rc']})"
            print(f" {measured['wall_s']:.0f} s, {status}", flush=True)
            if measured["rc"] != 0:
                print(log_tail(setup.logs / f"{stage.name}.log"))
    except KeyboardInterrupt:
        print("\ninterrupted: the stages run so far are reported", file=sys.stderr)
    ran = [s for s in setup.stages if s.result]
    return Measured(ran, work, floors, device, time.perf_counter() - began_all)


if __name__ == "__main__":
    sys.exit(main())
