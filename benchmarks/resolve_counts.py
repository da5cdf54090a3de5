"""How often a study resolves the same things: counted, not timed.

Runs a small svm study in this process (sweeps/svm_c.yaml, the bundled digits, random weights,
32 px) twice on one feature cache, each in a new process: the first fills the cache, the second is
the "warm cache" study. A profiler hook counts calls of the functions below,
before the first trial and in each trial:

  * config builds: ``make_config`` (a setting validated into a RunConfig)
  * device resolutions: ``resolve_device``
  * networks built: ``torchvision`` model constructors (real or on the meta device)
  * precision choices: ``choose_precision`` / ``choose_head_precision``
  * the precision's path: calls of scenesweep functions that take a ``precision`` argument (the
    resolved choice handed down towards the convolution and the head), and how many distinct
    functions and files they are

    .venv/bin/python benchmarks/resolve_counts.py [--n-trials 4]

Prints one table; nothing is asserted (tests/test_sweeps.py asserts what must hold).
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COUNTED = {"make_config": "config builds (make_config)", "resolve_device": "device resolutions",
           "choose_precision": "precision choices (extraction)", "choose_head_precision": "precision choices (head)",
           "choose_extraction": "precision probes (extraction)", "choose_head": "precision probes (head)"}
NETWORK_FILES = ("torchvision/models/vgg.py", "torchvision/models/resnet.py", "torchvision/models/convnext.py",
                 "torchvision/models/efficientnet.py", "torchvision/models/vision_transformer.py")


class CallCounter:
    """Counts calls by phase ('before the first trial', 'trial N') with sys.setprofile."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.precision_path: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        code = frame.f_code
        name, filename = code.co_name, code.co_filename
        if name == "_run_trial" and filename.endswith("runs/sweep.py"):
            self.phase = f"trial {frame.f_locals['trial'].number}"
        elif name == "summarise" and filename.endswith("runs/summary.py"):
            self.phase = "summary"
        key = f"{name}@{os.path.basename(filename)}" if name == "__init__" else name
        if "/scenesweep/" in filename and "precision" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
            self.counts[self.phase]["calls handed a precision"] += 1
            self.precision_path[self.phase].add((name, filename.split("/scenesweep/", 1)[1]))
        if key in COUNTED:
            self.counts[self.phase][COUNTED[key]] += 1
        elif name == "__init__" and filename.endswith(NETWORK_FILES) and \
                type(frame.f_locals.get("self")).__module__.startswith("torchvision.models"):
            if frame.f_locals["self"].__class__.__name__ in ("VGG", "ResNet", "ConvNeXt", "EfficientNet",
                                                            "VisionTransformer"):
                self.counts[self.phase]["networks built"] += 1


def run(n_trials: int, cache: Path, store: Path, name: str, counter: CallCounter | None) -> None:
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study

    overrides = {"data": "digits", "train_per_class": "10", "image_size": "32", "cache_dir": str(cache),
                 "precision": "fp32"}
    if counter is not None:
        counter.phase = "before the first trial"
        sys.setprofile(counter)
        threading.setprofile(counter)
    try:
        spec = load_study(REPO / "sweeps" / "svm_c.yaml", overrides)
        run_study(spec, storage=f"sqlite:///{store / 'optuna.db'}", study_name=name, n_trials=n_trials,
                  progress=False, register=False)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=4)
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # one study in this process, in --store
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        store = Path(args.store)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        os.environ.setdefault("TQDM_DISABLE", "1")
        counter = CallCounter()
        run(args.n_trials, store / "cache", store, args.phase, counter)
        print_counts(f"{args.phase} cache, a new process", counter)
        return
    with tempfile.TemporaryDirectory() as tmp:
        # Each study in a process of its own: a warm cache on disk, nothing remembered in memory.
        for phase in ("cold", "warm"):
            subprocess.run([sys.executable, __file__, "--n-trials", str(args.n_trials), "--phase", phase,
                            "--store", tmp], check=True, stderr=subprocess.DEVNULL)


def print_counts(title: str, counter: CallCounter) -> None:
    phases = list(counter.counts)
    names = sorted({k for c in counter.counts.values() for k in c})
    width = max(len(n) for n in names)
    print(f"\n{title}\n{'':{width}}  " + "  ".join(f"{p:>22}" for p in phases))
    for n in names:
        print(f"{n:{width}}  " + "  ".join(f"{counter.counts[p][n]:>22}" for p in phases))
    for phase, path in counter.precision_path.items():
        files = sorted({f for _, f in path})
        print(f"  precision's path, {phase}: {len(path)} functions in {len(files)} files: "
              + ", ".join(sorted(f"{f}:{n}" for n, f in path)))


if __name__ == "__main__":
    main()
