"""The report's "Accuracy against cost" section: every multi-objective study's Pareto front.

A study with several objectives (``objectives:``, e.g. ``sweeps/backbones_pareto.yaml``: validation
accuracy against prediction time per image) logs its front on its parent run: ``pareto.csv`` and
``plots/optuna_pareto_front.png`` (``runs.summary.log_pareto``). The report shows each front as a
table and its plot, the trial the study registered marked, demo figures labelled as such.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from .finding import resolved_params
from .reading import DEMO_LABEL, download, table
from ..specs.experiments import is_demo_setting


def _number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.4g}"


def cost_section(client: MlflowClient, figures: Path, downloads: Path) -> str:
    """Markdown for every study parent that logged a Pareto front ('' when there is none)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return ""
    parents = client.search_runs(experiments, "tags.sweep = 'parent'", max_results=5000,
                                 order_by=["attributes.start_time ASC"])
    parents = [p for p in parents if p.data.tags.get("pareto_trials") is not None]
    if not parents:
        return ""
    lines = ["## Accuracy against cost", "",
             "Studies with several objectives: their Pareto fronts (no trial on the front is beaten on every "
             "objective by another). `time/predict_ms_per_image` is what the registered model's predict costs per "
             "image at batch 1 on the machine named; `model/size_mb` what it takes on disk. The trial registered "
             "(by the study's `select` rule) is marked; any other can be registered with "
             "`scenesweep register --study S --trial N`.", ""]
    for parent in parents:
        tags, params = parent.data.tags, parent.data.params
        study = tags.get("study", parent.info.run_id)
        label = f" (**{DEMO_LABEL}** figures: not 15-Scene results)" if is_demo_setting(resolved_params(parent)) else ""
        lines += [f"### `{study}`{label}", "",
                  f"Objectives: {params.get('objectives', params.get('objective', ''))}"
                  + (f"; constraints: {params['constraints']}" if params.get("constraints") else "")
                  + (f"; registered: {params['select']}" if params.get("select") else "") + ".", ""]
        local = download(parent.info.run_id, "pareto.csv", downloads / parent.info.run_id)
        rows = list(csv.DictReader(local.open())) if local is not None else []
        if not rows:
            lines += ["The front is empty (no feasible trial completed).", ""]
            continue
        chosen = tags.get("best_trial", "")
        columns = [c for c in rows[0] if c not in ("rank", "run_id", "warm_start_source")]
        body = [[("**#" + r["trial"] + "** (registered)") if r["trial"] == chosen else "#" + r["trial"],
                 *[_number(r[c]) for c in columns if c != "trial"]] for r in rows]
        lines += [table(["trial", *[c.replace("param.", "") for c in columns if c != "trial"]], body), ""]
        plot = download(parent.info.run_id, "plots/optuna_pareto_front.png", downloads / parent.info.run_id)
        if plot is not None:
            name = f"pareto_{parent.info.run_id[:8]}.png"
            shutil.copyfile(plot, figures / name)
            lines += [f"![Pareto front of {study}](figures/{name})", ""]
    return "\n".join(lines) + "\n"
