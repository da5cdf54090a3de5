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
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/floor.py, _common.py
from _common import load_numbers, table  # noqa: E402

# The reference report's per-batch figures (STUDY.md, pooling table, max pooling): seconds per
# mini-batch of 8 images, to extract (its "test" column) and to train (its "train" column).
REFERENCE_BATCH = 8
REFERENCE_EXTRACT_S_PER_BATCH = 2.6
REFERENCE_TRAIN_S_PER_BATCH = 5.15

POLL_S = 0.5  # RSS sampling period of a running experiment
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
POOL5_WIDTH = 512 * 7 * 7  # VGG's adaptive average pool to 7x7 makes pool5 25088-d at any input size
USER_ATTR_RUN_ID = "mlflow_run_id"  # the trial's MLflow run (README: Sweeps, Tracking)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def show_load(load: list[float] | None) -> str:
    return "n/a" if load is None else f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when missing); files vanishing meanwhile are skipped."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def natural_key(path: Path) -> tuple:
    """q1 < q3 < q8 < q12_1 < q12_2: numbers compared as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def fmt(value: Any, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def machine_line(device: str) -> str:
    """CPU model and speed flags, torch's CPU capability, cores, threads (the GPU on CUDA)."""
    import floor
    from scenesweep.compute import hardware

    return hardware.describe(floor.resolve_device(device))


def machine_details(device: str) -> dict[str, str]:
    from scenesweep.compute import hardware

    return hardware.machine_facts(device)


def scenesweep_command() -> list[str]:
    """The ``scenesweep`` console script of this interpreter's environment (else ``python -m scenesweep``)."""
    script = Path(sys.executable).parent / "scenesweep"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scenesweep"]


def imagenet_weights_present() -> Path | None:
    """torchvision's cached VGG16 ImageNet checkpoint, when present (nothing is downloaded)."""
    try:
        from scenesweep.compute.backbone import imagenet_checkpoint  # where scenesweep itself looks

        path = Path(imagenet_checkpoint())
    except Exception:  # noqa: BLE001 - the package moved: fall back to torchvision's default place
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Pass-through arguments, checked per experiment
# --------------------------------------------------------------------------------------------

def split_options(args: list[str]) -> list[list[str]]:
    """['--a', '1', '--flag', '--b=2'] -> [['--a', '1'], ['--flag'], ['--b=2']]."""
    groups: list[list[str]] = []
    for token in args:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def option_name(group: list[str]) -> str:
    return group[0][2:].split("=", 1)[0]


# How the CLI names an option it refuses: "error: FILE: --epochs: unknown run parameter ...", or
# click's own "No such option: --x".
REFUSED_OPTION = re.compile(r"(?:: |No such option: )--([A-Za-z][\w-]*)(?::|\b)")


@dataclass
class Stage:
    """One experiment file, its command and what the run of it measured."""

    file: Path
    command: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    check_output: str = ""
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.file.stem


def check_stage(stage: Stage, base: list[str], extra: list[list[str]], env: dict) -> str | None:
    """Build the stage's command; drop the pass-through options its ``--check`` refuses.

    Returns:
        None when the command checks, else the error the check printed.
    """
    kept = [list(g) for g in extra]
    while True:
        command = base + [str(stage.file.relative_to(REPO))] + [t for g in kept for t in g]
        done = subprocess.run(command + ["--check"], env=env, cwd=REPO, capture_output=True, text=True)
        output = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            stage.command, stage.check_output = command, output
            return None
        refused = REFUSED_OPTION.search(output)
        names = [option_name(g) for g in kept]
        if refused and refused.group(1) in names and refused.group(1) != "data":
            index = names.index(refused.group(1))
            stage.dropped.append(" ".join(kept.pop(index)))
            continue
        return output or f"exit status {done.returncode}"


# --------------------------------------------------------------------------------------------
# Running one experiment under measurement
# --------------------------------------------------------------------------------------------

def tree_rss(process) -> int:
    """RSS of a process and all its descendants now (bytes; shared pages counted in each)."""
    import psutil

    total = 0
    try:
        members = [process] + process.children(recursive=True)
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], env: dict, log_path: Path, timeout_s: float | None) -> dict:
    """Run ``command`` (its own process group), output to ``log_path``; wall, CPU and peak RSS.

    The child is reaped with ``os.wait4``, whose rusage gives its CPU time and ru_maxrss (the
    largest single process of its tree); psutil samples the whole tree's RSS every POLL_S.
    Ctrl-C or the timeout stops the whole process group.
    """
    import psutil

    began = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        watched = psutil.Process(child.pid)
        polled_peak, timed_out = 0, False
        try:
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                polled_peak = max(polled_peak, tree_rss(watched))
                if timeout_s and time.perf_counter() - began > timeout_s and not timed_out:
                    timed_out = True
                    os.killpg(child.pid, signal.SIGTERM)
                time.sleep(POLL_S)
        except BaseException:
            with_suppressed_kill(child.pid)
            raise
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    max_rss = usage.ru_maxrss * 1024  # KiB on Linux
    return {"rc": child.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - began,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": max(polled_peak, max_rss),
            "polled_tree_rss_bytes": polled_peak, "max_rss_bytes": max_rss}


def with_suppressed_kill(pid: int) -> None:
    """Stop a child's whole process group (SIGTERM, then SIGKILL) and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.2)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Reading the stores
# --------------------------------------------------------------------------------------------

def all_runs(client) -> dict[str, Any]:
    """Every run of every experiment (deleted ones too), by run id."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = {}, None
    while experiments:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs.update({r.info.run_id: r for r in page})
        token = page.token
        if not token:
            break
    return runs


def optuna_storage_url(runs: dict, default: str) -> str:
    """The Optuna storage the studies used: the parent runs' ``optuna.storage`` tag, else ``default``."""
    for run in runs.values():
        url = run.data.tags.get("optuna.storage")
        if url and url.startswith("sqlite:"):
            return url
    return default


def all_trials(storage_url: str) -> dict[tuple[str, int], Any]:
    """Every trial of every study in the storage, by (study name, number); {} when none exists."""
    path = storage_url[len("sqlite:///"):] if storage_url.startswith("sqlite:///") else None
    if path is not None and not Path(path).is_file():
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = {}
    for name in optuna.get_all_study_names(storage=storage_url):
        study = optuna.load_study(study_name=name, storage=storage_url)
        trials.update({(name, t.number): t for t in study.get_trials(deepcopy=False)})
    return trials


def param(run, name: str, default: Any = None) -> Any:
    """A run parameter as resolved: ``resolved.<name>`` (set when `mlflow run` logged it as given) first."""
    params = run.data.params
    return params.get(f"resolved.{name}", params.get(name, default))


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir()
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_sizes(data: str, train_per_class: int, val_fraction: float) -> dict[str, int]:
    """Training-split size and class count from the folder and the README's protocol.

    Flat layout: ``train_per_class`` images per class for training, the rest for test; then
    ``round(n * val_fraction)`` of each class's training images for validation. With
    ``train/`` and ``test/``: the same carving of ``train/``. (Trials log no split sizes.)
    """
    root = Path(data)
    if (root / "train").is_dir():
        pools = [count_images(c) for c in class_folders(root / "train")]
        total = sum(pools) + sum(count_images(c) for c in class_folders(root / "test"))
    else:
        counts = [count_images(c) for c in class_folders(root)]
        pools, total = [train_per_class] * len(counts), sum(counts)
    n_train = sum(pool - int(round(pool * val_fraction)) for pool in pools)
    return {"n_train": n_train, "n_classes": len(pools), "n_images": total}


def feature_width(layer: str, fc_width: int) -> int:
    return POOL5_WIDTH if layer == "pool5" else fc_width


@dataclass
class WorkRun:
    """A run that fitted a head (a single run or a trial), with the work it did."""

    run_id: str
    stage: str
    head: str
    own_setting: bool  # a single run or an enqueued trial: the study's own settings
    duration_s: float
    images_extracted: int
    extract_key: tuple | None  # (arch, image_size, batch_size, precision) of its extraction
    extract_images_per_s: float | None
    epochs: int
    steps: int
    head_key: tuple | None  # (widths, batch_size) of an mlp head
    logged_step_s: float | None
    refit_steps: int = 0
    branches: int = 1  # pooling types its one extraction pass filled (the trunk shared)


def describe_runs(stage: str, runs: list, trials_by_run: dict, client, data_dir: str,
                  parents: list) -> list[WorkRun]:
    """The work runs of one stage: extraction, epochs and steps of each (refits included)."""
    work: list[WorkRun] = []
    by_id = {r.info.run_id: r for r in runs}
    for run in runs:
        head = param(run, "head")
        if head not in ("svm", "mlp") or run.data.tags.get("sweep") in ("parent", "worker"):
            continue
        trial = trials_by_run.get(run.info.run_id)
        own = trial is None or bool(trial.system_attrs.get("fixed_params"))
        end = run.info.end_time or run.info.start_time
        metrics = run.data.metrics
        batch_size = int(param(run, "batch_size", 32))
        images = 0
        extract_key = None
        if run.data.tags.get("conv_cache") == "miss":
            n_images = sum(int(param(run, f"n_{s}", 0) or 0) for s in ("train", "val", "test"))
            if not n_images:
                n_images = split_sizes(param(run, "data", data_dir), int(param(run, "train_per_class", 100)),
                                       float(param(run, "val_fraction", 0.2)))["n_images"]
            images = n_images
            precision = param(run, "resolved.precision") or param(run, "precision", "auto")
            extract_key = (param(run, "arch", "vgg16"), int(param(run, "image_size", 224)), batch_size, precision)
        epochs = steps = 0
        head_key = None
        if head == "mlp":
            epochs = len(client.get_metric_history(run.info.run_id, "train/loss"))
            sizes = split_sizes(param(run, "data", data_dir), int(param(run, "train_per_class", 100)),
                                float(param(run, "val_fraction", 0.2)))
            n_train = int(param(run, "n_train", sizes["n_train"]))
            n_classes = int(param(run, "n_classes", sizes["n_classes"]))
            hidden = [int(h) for h in str(param(run, "hidden", "1024,1024")).split(",") if h.strip()]
            widths = (feature_width(param(run, "layer", "pool5"), int(param(run, "fc_width", 4096))),
                      *hidden, n_classes)
            per_epoch = math.ceil(n_train / batch_size)
            steps = epochs * per_epoch
            head_key = (widths, batch_size)
        # A pooling study's first pass fills every pooling type's conv entry at once.
        branches = int(metrics.get("time/extract_branches", 1) or 1) if images else 1
        work.append(WorkRun(run.info.run_id, stage, head, own, max(0.0, (end - run.info.start_time) / 1000),
                            images, extract_key, metrics.get("time/extract_images_per_s") if images else None,
                            epochs, steps, head_key, metrics.get("time/train_batch_median_s"), branches=branches))
    # Refits: the test evaluation of a study's best trial (on the parent: best/val/acc_refit) and
    # of the best trial per group (on the trial's run: val/acc_refit) train the head again, fully.
    by_work = {w.run_id: w for w in work}
    refitted = [r.info.run_id for r in runs if "val/acc_refit" in r.data.metrics]
    for parent in parents:
        if "best/val/acc_refit" in parent.data.metrics and parent.data.tags.get("best_run_id"):
            refitted.append(parent.data.tags["best_run_id"])
    for run_id in refitted:
        target = by_work.get(run_id)
        if target is not None and target.head == "mlp" and run_id in by_id:
            full_epochs = int(param(by_id[run_id], "epochs", target.epochs))
            target.refit_steps += full_epochs * (target.steps // max(target.epochs, 1))
    return work


# --------------------------------------------------------------------------------------------
# The floor
# --------------------------------------------------------------------------------------------

@dataclass
class StageFloor:
    """The floor of one stage's settings, measured right after the stage (same machine state).

    Attributes:
        ceilings: extraction key (arch, image_size, batch_size, precision) -> floor.ConvCeiling.
        heads: head key (widths, batch_size) -> floor.HeadStep.
        load: load average when it was measured.
    """

    ceilings: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    load: list[float] | None = None

    def extract_s(self, w: WorkRun) -> float:
        """Its images at the summed conv-layer ceiling; a shared pass of b pooling types: the
        layers before the first pooling (block 1) once, the others b times."""
        if not w.extract_key:
            return 0.0
        ceiling = self.ceilings[w.extract_key]
        if w.branches <= 1:
            return w.images_extracted * ceiling.seconds_per_image
        trunk = sum(layer.time_s(ceiling.statistic) for layer in ceiling.layers if layer.name.startswith("conv1_"))
        per_batch = trunk + w.branches * (ceiling.seconds_per_batch - trunk)
        return w.images_extracted * per_batch / ceiling.batch_size

    def head_s(self, w: WorkRun, steps: int) -> float:
        return steps * self.heads[w.head_key].floor_s if w.head_key else 0.0

    def as_dict(self) -> dict:
        return {"load_average": self.load,
                "conv_ceilings": [{"key": list(k), **c.as_dict()} for k, c in self.ceilings.items()],
                "head_steps": [{"key": [list(k[0]), k[1]], **h.as_dict()} for k, h in self.heads.items()]}


def measure_floor(work: list[WorkRun], device, repeats: int, steps: int) -> StageFloor:
    """The summed conv-layer ceiling and the bare head step of every setting in ``work``."""
    import floor

    measured = StageFloor(load=load_numbers())
    for key in sorted({w.extract_key for w in work if w.extract_key}, key=str):
        arch, image_size, batch_size, precision = key
        # The floor is the faster precision's ceiling, whichever the run chose (or was given).
        candidates = [floor.conv_ceiling(arch, image_size, batch_size, p, device, repeats) for p in floor.PRECISIONS]
        measured.ceilings[key] = min(candidates, key=lambda c: c.seconds_per_batch)
    for key in sorted({w.head_key for w in work if w.head_key}, key=str):
        widths, batch_size = key
        measured.heads[key] = floor.head_step(widths, batch_size, device=device, steps=steps)
    return measured


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

def select_experiments(tokens: str | None) -> list[Path]:
    files = sorted(EXPERIMENTS.glob("*.yaml"), key=natural_key)
    if not tokens:
        return files
    chosen = []
    for token in [t.strip() for t in tokens.split(",") if t.strip()]:
        matches = [f for f in files if f.stem == token or f.stem.startswith(token + "_")]
        if not matches:
            raise ValueError(f"--experiments {token}: no experiments/{token}*.yaml; expected some of: "
                             + ", ".join(f.stem for f in files))
        chosen += [m for m in matches if m not in chosen]
    return sorted(chosen, key=natural_key)


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


@dataclass
class Setup:
    """What every stage of one benchmark shares: the data, the stages' checked commands, the
    weights, the environment of the processes, and where stores, cache, logs and report go."""

    command_line: str
    started_at: str
    load_start: list[float] | None
    data: Path
    weights: str
    stages: list[Stage]
    env: dict
    store: Path
    cache: Path
    logs: Path
    out: Path | None


@dataclass
class Measured:
    """What the stages ran and cost: their work runs, each stage's floor, the whole wall time."""

    ran: list[Stage]
    work: list[WorkRun]
    floors: dict[str, StageFloor]
    device: Any
    study_wall_s: float


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


def chosen_weights(asked: str) -> str:
    """``auto``: ImageNet's when torchvision's cache holds the checkpoint, else random; printed."""
    checkpoint = imagenet_weights_present()
    weights = ("imagenet" if checkpoint else "random") if asked == "auto" else asked
    print(f"weights: {weights}" + (f" ({checkpoint})" if weights == "imagenet" and checkpoint else
                                   " (no ImageNet checkpoint in torchvision's cache)" if not checkpoint else ""))
    return weights


def stage_environment(store: Path) -> dict:
    """The experiments' environment: this store, no run or experiment inherited, no progress bars.
    This process reads the same store."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{(store / 'mlflow.db').as_posix()}",
                "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")})
    return env


def checked_stages(files: list[Path], extra_groups: list[list[str]], env: dict) -> list[Stage] | None:
    """Every stage's command, checked (``--check``) before anything runs; None if one fails."""
    base = scenesweep_command() + ["run"]
    stages = [Stage(f) for f in files]
    failed = [f"{stage.name}: {error}" for stage in stages
              if (error := check_stage(stage, base, extra_groups, env))]
    if failed:
        print("error: an experiment does not check; nothing was run:\n  " + "\n  ".join(failed), file=sys.stderr)
        return None
    for stage in stages:
        print(f"  {stage.name}: {' '.join(shlex.quote(t) for t in stage.command)}"
              + (f"   [dropped here: {', '.join(stage.dropped)}]" if stage.dropped else ""))
    return stages


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


def read_stage(stage: Stage, measured: dict, new_runs: list, new_trials: list, client, setup: Setup) -> list[WorkRun]:
    """One stage's work runs, and its result (``stage.result``): runs, trial states, images,
    epochs, steps, the extractor's logged speed and the best accuracy."""
    trials_by_run = {t.user_attrs.get(USER_ATTR_RUN_ID): t for t in new_trials}
    parents = [r for r in new_runs if r.data.tags.get("sweep") == "parent"]
    stage_work = describe_runs(stage.name, new_runs, trials_by_run, client, str(setup.data), parents)
    states = defaultdict(int)
    for t in new_trials:
        states[t.state.name] += 1
    best = {}
    for r in parents:
        best.update({k: v for k, v in r.data.metrics.items() if k.startswith(("best/val", "test/"))})
    if not parents:
        for r in new_runs:
            best.update({k: v for k, v in r.data.metrics.items() if k in ("val/acc", "test/acc")})
    measured.update({
        "runs": len(new_runs), "trials": dict(states),
        "images_extracted": sum(w.images_extracted * w.branches for w in stage_work),
        "epochs": sum(w.epochs for w in stage_work),
        "head_steps": sum(w.steps for w in stage_work),
        "refit_steps": sum(w.refit_steps for w in stage_work),
        "extract_images_per_s": [w.extract_images_per_s for w in stage_work if w.extract_images_per_s],
        "own_setting_runs_s": sum(w.duration_s for w in stage_work if w.own_setting),
        "accuracy": best, "log": str(setup.logs / f"{stage.name}.log")})
    stage.result = measured
    return stage_work


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


if __name__ == "__main__":
    sys.exit(main())
