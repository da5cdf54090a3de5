"""Section 3 of benchmarks/sweep.py: sweep_pooling (sweeps/pooling.yaml) run twice with the same
sampler seed, with the file's pruner and with none: epochs trained and best validation accuracy.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, the other sweep_*.py modules
from _common import median  # noqa: E402
from sweep_common import (IMAGE_SIZE, SWEEPS, child_runs, duration_s, load_trials, plural, say, short,  # noqa: E402
                           table)


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
    from scenesweep.core.backbone_families import family_of
    from scenesweep.core.config import make_config
    from scenesweep.runs.sweep import run_study
    from scenesweep.specs.studies import load_study

    overrides = {"data": data, "train_per_class": train_per_class, "image_size": IMAGE_SIZE,
                 "epochs": epochs, "cache_dir": str(cache_dir)}
    # Extract VGG16's four poolings first, so that neither study pays for them: the comparison is
    # of training epochs, and the second study would otherwise find everything cached. (The
    # registry's every pooling includes the global ones VGG refuses: gem, token.)
    began = time.perf_counter()
    for pooling in family_of("vgg16").poolings:
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

