"""Studies side by side: every study in the tracking store as one row (``scenesweep studies``),
written as a table, Markdown and CSV, and the best-so-far curves of chosen studies in one figure.

MLflow has no view of grouped runs (mlflow#3762 is open): a study is its parent run. Everything
here is read from MLflow alone (the parents' params, tags and live metrics, their trials' runs),
so it works on a SQLite store and through a tracking server, and never needs the Optuna
storage or its password.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import time
from typing import Any

from mlflow.tracking import MlflowClient

from ..specs.experiments import is_demo_setting
from ..tracking import plots
from .finding import resolved_params
from .reading import DEMO_LABEL

# The parent's live metrics (``runs.sweep.log_progress``): counts by state, the best so far.
COUNTS = {"complete": "trials/complete", "pruned": "trials/pruned", "failed": "trials/fail"}
COLUMNS = ("study", "experiment", "setting", "objective", "complete", "pruned", "failed", "running", "best", "best trial",
           "test acc", "version", "wall time (min)", "status", "hardware")


@dataclasses.dataclass
class StudyRow:
    """A study as its parent run tells it.

    Attributes:
        metric, direction: the objective (e.g. "val/acc", "maximize").
        best_value, best_trial: the best objective so far and its trial number (None: none complete).
        test_acc: the one test evaluation of the best trial (None until the study is summarised).
        version: the registered model and version ("scene-classifier v3"), or "".
        wall_s: the parent's start to its end (to now while it runs).
        hardware: the machine of the worker that created it.
        setting: "real", or DEMO (random weights or the digits: never 15-Scene figures).
    """

    study: str
    experiment: str
    setting: str
    parent_run_id: str
    metric: str
    direction: str
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_trial: str
    test_acc: float | None
    version: str
    wall_s: float
    status: str
    hardware: str

    def cells(self) -> list[str]:
        best = "–" if self.best_value is None else f"{self.best_value:.4f}"
        test = "–" if self.test_acc is None else f"{self.test_acc:.4f}"
        return [self.study, self.experiment, self.setting, f"{self.direction} {self.metric}", str(self.complete), str(self.pruned),
                str(self.failed), str(self.running), best, self.best_trial or "–", test, self.version or "–",
                wall_text(self.wall_s), self.status, self.hardware]


def wall_text(seconds: float) -> str:
    """Minutes, one unit for the whole column (its header says so): '0.7', '12.5', '193.0'."""
    return f"{seconds / 60:.1f}"


def short_hardware(tags: dict[str, str]) -> str:
    """A column's worth of a run's ``hardware.*`` tags: the GPU, else the CPU (AMX or not) and cores."""
    if tags.get("hardware.gpu"):
        return tags["hardware.gpu"]
    cpu = tags.get("hardware.cpu", "unknown CPU")
    amx = {"true": ", AMX", "false": ", no AMX"}.get(tags.get("hardware.cpu_amx", ""), "")
    cores = tags.get("hardware.cpu_cores_logical")
    return f"{cpu}{amx}" + (f", {cores} cores" if cores else "")


def _objective(params: dict[str, str]) -> tuple[str, str]:
    """The parent's ``objective`` param, "maximize val/acc" -> ("val/acc", "maximize")."""
    direction, _, metric = params.get("objective", "maximize val/acc").partition(" ")
    return metric or "val/acc", direction


def _running_children(client: MlflowClient, experiment_ids: list[str]) -> dict[str, int]:
    """Running trial runs per parent run id."""
    running: dict[str, int] = {}
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000):
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            running[parent] = running.get(parent, 0) + 1
    return running


def list_studies(client: MlflowClient | None = None) -> list[StudyRow]:
    """Every study parent in the store's active experiments, oldest first."""
    client = client or MlflowClient()
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    parents = client.search_runs(list(experiments), "tags.sweep = 'parent'", max_results=5000,
                                 order_by=["attributes.start_time ASC"])
    running = _running_children(client, list(experiments))
    rows = []
    for parent in parents:
        params, tags, metrics = parent.data.params, parent.data.tags, parent.data.metrics
        metric, direction = _objective(params)
        best = metrics.get(f"best/{metric}", metrics.get(f"best/{metric.replace('/', '_')}"))
        ended = parent.info.end_time if parent.info.status != "RUNNING" and parent.info.end_time else time.time() * 1000
        model = tags.get("registered_model", "")
        rows.append(StudyRow(
            study=tags.get("study", parent.info.run_name or parent.info.run_id),
            experiment=experiments[parent.info.experiment_id],
            setting=DEMO_LABEL if is_demo_setting(resolved_params(parent)) else "real",
            parent_run_id=parent.info.run_id, metric=metric, direction=direction,
            **{name: int(metrics.get(key, 0)) for name, key in COUNTS.items()},
            running=running.get(parent.info.run_id, 0), best_value=best,
            best_trial=f"#{tags['best_trial']}" if tags.get("best_trial", "").isdigit() else "",
            test_acc=metrics.get("test/acc"),
            version=f"{model} v{tags['registered_version']}" if model and tags.get("registered_version") else "",
            wall_s=max(0.0, (ended - parent.info.start_time) / 1000), status=parent.info.status,
            hardware=short_hardware(tags)))
    return rows


def text_table(rows: list[StudyRow]) -> str:
    """The rows as aligned columns for a terminal."""
    cells = [list(COLUMNS), *[r.cells() for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def markdown_table(rows: list[StudyRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[StudyRow]) -> str:
    """Every field, values unformatted (a spreadsheet's input)."""
    out = io.StringIO()
    fields = [f.name for f in dataclasses.fields(StudyRow)]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow(dataclasses.asdict(row))
    return out.getvalue()


def find_study(rows: list[StudyRow], name: str) -> StudyRow:
    """The study called ``name`` (the latest, if several stores' studies share it)."""
    matches = [r for r in rows if r.study == name]
    if not matches:
        known = ", ".join(sorted({r.study for r in rows})) or "none"
        raise LookupError(f"--compare {name}: no such study in the tracking store; studies: {known}")
    return matches[-1]


def best_so_far(client: MlflowClient, row: StudyRow) -> list[tuple[int, float]]:
    """(trial number, best objective after it) from the parent's live chart."""
    history = (client.get_metric_history(row.parent_run_id, f"best/{row.metric}")
               # stores written before the series took the final best's name
               or client.get_metric_history(row.parent_run_id, f"best/{row.metric.replace('/', '_')}"))
    by_step: dict[int, float] = {}
    for point in sorted(history, key=lambda m: (m.step, m.timestamp)):
        by_step[point.step] = point.value
    return sorted(by_step.items())


def compare_figure(client: MlflowClient, rows: list[StudyRow]) -> Any:
    """The best-so-far curves of ``rows`` (one objective axis; each study's own trial numbers)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        points = best_so_far(client, row)
        if points:
            steps, values = zip(*points)
            ax.step(steps, values, where="post", marker=".", label=f"{row.study} ({row.experiment})")
    metrics = sorted({r.metric for r in rows})
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"best {' / '.join(metrics)} so far")
    ax.set_title("Studies compared: best objective so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_compare(client: MlflowClient, rows: list[StudyRow], path) -> None:
    plots.save_figure(compare_figure(client, rows), path)
