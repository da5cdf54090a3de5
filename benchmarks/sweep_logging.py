"""Section 4 of benchmarks/sweep.py: the MLflow logging of one trial's child run (create_run, one
log_batch of 40 metrics, set_terminated; an epoch's log_batch; the real Objective's overhead)
against the compute of an SVM trial.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, the other sweep_*.py modules
from _common import median, objective_overhead  # noqa: E402
from sweep_common import duration_s, say, table  # noqa: E402
from sweep_pooling import PoolingResult  # noqa: E402


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

