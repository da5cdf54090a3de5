"""What the benchmark scripts share: the machine and its load, tables, FLOP counts, digits subsets.

torchvision's ``references/classification/utils.py`` is the model: one helpers module beside the
scripts. Heavy imports (torch, scenesweep) happen inside the functions that need them, so that a
script's ``--help`` stays quick.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Run from a checkout without installing: src/ on the path when scenesweep is not importable.
try:
    import scenesweep  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(REPO / "src"))


def load_numbers() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_average() -> str:
    """The load averages against the core count: above about 1 per core, someone shares the CPU."""
    load = load_numbers()
    if load is None:
        return "n/a"
    return f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"


def machine_line(device: Any = "auto") -> str:
    """The machine in one line: CPU model and speed flags, torch's capability, cores, threads
    (the GPU on CUDA), as runs tag it (``hardware.*``)."""
    from scenesweep.compute import features, hardware

    resolved = device if not isinstance(device, str) else hardware.resolve_device(device)
    return hardware.describe(resolved)


def table(header: list[str], rows: list[list[Any]], indent: str = "") -> str:
    """Plain-text table with right-aligned columns (the first left-aligned)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def flops_per_image(image_size: int, arch: str = "vgg16", fc_width: int = 4096, layer: str = "relu7") -> tuple[float, float]:
    """(convolutions, fc layers up to ``layer``) FLOPs per image: one multiply-add = 2 FLOPs,
    biases, ReLUs and pooling left out (under 0.1 % of VGG16), as in the usual 15.5 GMAC figure.

    The convolutions come from the shapes each Conv2d sees on the meta device
    (``scenesweep.compute.precision.conv_shapes``, what ``precision=auto`` times); fc6 is
    25088 x width and fc7 width x width.
    """
    from scenesweep.compute import backbone, precision

    conv = sum(s.gflop for s in precision.conv_shapes(backbone.trunk(backbone.architecture(arch)), image_size, 1)) * 1e9
    fc_layers = {"pool5": 0, "fc6": 1, "relu6": 1, "fc7": 2, "relu7": 2}[layer]
    fc = 2.0 * (512 * 7 * 7 * fc_width * (fc_layers >= 1) + fc_width * fc_width * (fc_layers >= 2))
    return conv, fc


def digits_subset(root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each digit, as a flat class-folder dataset under ``root``
    (written once; the full digits folder beside it)."""
    from scenesweep.compute.data import write_digits

    full = write_digits(root / "digits-full")
    subset = root / f"digits-{per_class}-per-class"
    if subset.is_dir():
        return subset
    for folder in sorted(p for p in full.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy2(image, subset / folder.name / image.name)
    return subset


def objective_overhead(tracking_uri: str, storage_url: str, setting: dict[str, Any], calls: int) -> dict[str, list[float]]:
    """What the real ``runs.objective.Objective`` costs beyond a trial's compute, per trial.

    An SVM trial (relu7, C=1, on ``setting``: data, image size, cache_dir... whose features are
    cached: extract them first) run ``calls`` + 2 times through the project's own Objective (its nested run, params, tags, datasets, metrics,
    dashboard note, kept head, end) on ``tracking_uri`` and ``storage_url``; and the same
    trial's compute alone (``prepare`` from the cache + ``fit_head``). The first two of each warm
    up connections and caches. Returns {"trial_s": [...], "compute_s": [...]}: their difference is
    the tracking's share.
    """
    import uuid

    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    from scenesweep.compute import training
    from scenesweep.runs.objective import Objective
    from scenesweep.specs.studies import load_study

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as workers run
    mlflow.set_tracking_uri(tracking_uri)
    point = {"C": 1.0, "layer": "relu7"}
    spec = load_study(REPO / "sweeps" / "svm_c.yaml", {k: v for k, v in setting.items() if k not in ("C", "layer")})
    spec = dataclasses.replace(spec, register="")
    config = spec.trial_config(point)
    shared = training.load_data(config)
    client = MlflowClient()
    name = f"overhead_{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    parent = client.create_run(experiment_id, run_name=f"{name} parent").info.run_id
    study = optuna.create_study(study_name=name, storage=storage_url, direction="maximize")
    objective = Objective(spec, name, parent, experiment_id, data=shared, progress=False)
    trial_s, compute_s = [], []
    for number in range(calls + 2):
        began = time.perf_counter()
        training.fit_head(training.prepare(config, progress=False, data=shared), config)
        compute = time.perf_counter() - began
        study.enqueue_trial(point)
        trial = study.ask()
        began = time.perf_counter()
        value = objective(trial)
        elapsed = time.perf_counter() - began
        study.tell(trial, value)
        if number >= 2:
            trial_s.append(elapsed)
            compute_s.append(compute)
    client.set_terminated(parent)
    return {"trial_s": trial_s, "compute_s": compute_s}
