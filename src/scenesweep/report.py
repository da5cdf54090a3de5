"""The report: our figures beside the reference study's, from the tracking store and Optuna.

For every experiment file (``experiments/*.yaml``) the report looks up its latest finished runs
(tagged ``scenesweep.experiment`` by ``scenesweep run``; a study's parent run launched directly
with ``scenesweep sweep`` counts too) and shows them in the way the study did:

  * ``describe`` (Q1): the parameter table and its totals;
  * ``imagenet`` (Q3): the top classes of each image;
  * ``featuremaps`` (Q4): the grids of maps, raw and thresholded;
  * a single ``run`` (Q12.2): train, validation and test accuracy, the epoch of the best
    validation accuracy, stability, seconds per batch, and the curves per epoch;
  * a ``study`` (Q8/Q10, Q12.1, Q12.3): every trial (read from the Optuna storage), the best
    trial of each value of the file's ``test_per`` key with the same columns, accuracy against
    each numeric dimension of the search space (e.g. C), and the curves per epoch.

Each figure is set beside the study's (the file's ``reference``), with the hardware it was
measured on. A real (15-Scene) run is preferred; a demo run (digits or random weights) is shown
only when there is no real one, and then is labelled as a demo figure everywhere. Every
experiment without a real run is named with the command that would produce it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from . import tracking  # noqa: E402
from .config import LAYERS, POOLINGS, UserError  # noqa: E402
from .experiments import (TAG_EXPERIMENT, TAG_SETTING, TAG_TEST_PER, Experiment,  # noqa: E402
                          experiment_files, is_demo_setting, load_experiment)

REPORT_EXPERIMENT = "report"
STABILITY_EPOCHS = 5  # stability: spread of val/acc over the last epochs
STABLE_SPREAD = 0.02  # a spread up to 2 percentage points counts as stable
DEMO_LABEL = "DEMO"
# The order in which group values are listed (the registries' own order where there is one).
GROUP_ORDER = {"pooling": POOLINGS, "layer": LAYERS}


# ---------------------------------------------------------------------------------------------
# Finding runs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Found:
    """The runs of one experiment: the one shown, and what is missing.

    Attributes:
        run: the run shown (latest finished real run, else latest finished demo run), or None.
        setting: "real" or "demo" for ``run``.
        other: the latest finished run of the other setting, when there is one.
    """

    experiment: Experiment
    run: Any = None
    setting: str | None = None
    other: Any = None


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    if not experiment_ids:
        return []
    return client.search_runs(experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                              max_results=1000)


def run_setting(run, experiment: Experiment) -> str:
    """'demo' or 'real': the tag set by ``scenesweep run``, else judged from the run's params."""
    tagged = run.data.tags.get(TAG_SETTING)
    if tagged in ("demo", "real"):
        return tagged
    params = run.data.params
    # A sweep's parent logs its fixed settings as fixed.<name>; a missing one took the default.
    values = {k[len("fixed."):]: v for k, v in params.items() if k.startswith("fixed.")} or params
    return "demo" if is_demo_setting(values, experiment.uses_data) else "real"


def _same_study_file(tag: str, experiment: Experiment) -> bool:
    if not tag:
        return False
    return Path(tag).as_posix().endswith(Path(experiment.what).as_posix())


def find_runs(client: MlflowClient, experiment: Experiment, experiment_ids: list[str]) -> Found:
    """The latest finished runs of ``experiment``, real and demo."""
    runs = _search(client, experiment_ids,
                   f"tags.`{TAG_EXPERIMENT}` = '{experiment.name}' and attributes.status = 'FINISHED'")
    if experiment.kind == "study":
        # Parent runs of the same study file launched with `scenesweep sweep` / `mlflow run -e sweep_*`.
        parents = _search(client, experiment_ids, "tags.sweep = 'parent' and attributes.status = 'FINISHED'")
        runs += [r for r in parents if TAG_EXPERIMENT not in r.data.tags
                 and _same_study_file(r.data.tags.get("study_file", ""), experiment)]
        runs.sort(key=lambda r: r.info.start_time, reverse=True)
    latest: dict[str, Any] = {}
    for run in runs:
        latest.setdefault(run_setting(run, experiment), run)
    found = Found(experiment)
    for setting in ("real", "demo"):
        if setting in latest:
            found.run, found.setting = latest[setting], setting
            found.other = latest.get("demo") if setting == "real" else None
            break
    return found


# ---------------------------------------------------------------------------------------------
# Reading what a run holds
# ---------------------------------------------------------------------------------------------

def hardware_text(tags: dict[str, str]) -> str:
    """'Intel Xeon ..., 2 logical cores, torch 2.14.1 (2 threads), device cpu' from hardware.* tags."""
    if not tags.get("hardware.cpu"):
        return "not recorded"
    parts = []
    if tags.get("hardware.gpu"):
        parts.append(f"{tags['hardware.gpu']} ({tags.get('hardware.gpu_memory_gib', '?')} GiB)")
    parts.append(f"{tags['hardware.cpu']}, {tags.get('hardware.cpu_cores_logical', '?')} logical cores, "
                 f"{tags.get('hardware.memory_gib', '?')} GiB")
    parts.append(f"torch {tags.get('hardware.torch', '?')} ({tags.get('hardware.torch_threads', '?')} threads), "
                 f"device {tags.get('hardware.device', '?')}")
    return "; ".join(parts)


def setting_text(found: Found, params: dict[str, str]) -> str:
    """What the figures were measured on, with the demo label when they are demo figures."""
    shown = [f"{k}={params[k]}" for k in ("data", "weights", "image_size", "train_per_class", "batch_size")
             if k in params]
    if not found.experiment.uses_data:
        shown = [s for s in shown if not s.startswith(("data=", "train_per_class="))]
    if found.setting == "demo":
        return (f"**{DEMO_LABEL}** ({', '.join(shown)}): a demo figure, not a 15-Scene result")
    return f"real setting ({', '.join(shown)})"


def run_params(run) -> dict[str, str]:
    """Run parameters, with a sweep parent's fixed.<name> and 'resolved.<name>' taken as the name."""
    params = dict(run.data.params)
    for key, value in list(params.items()):
        for prefix in ("fixed.", "resolved."):
            if key.startswith(prefix):
                params[key[len(prefix):]] = value
    return params


def download(client: MlflowClient, run_id: str, path: str, target: Path) -> Path | None:
    """An artifact file or folder of a run, copied under ``target``; None when it is missing."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                         dst_path=str(target)))
    except Exception:  # a missing artifact: the report says so instead of failing
        return None
    return local if local.exists() else None


def history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a per-epoch metric, sorted by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def epoch_summary(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Best epoch by val/acc and the stability of val/acc over the last epochs (empty for an SVM)."""
    val = history(client, run_id, "val/acc")
    if len(val) < 2:
        return {}
    steps, values = zip(*val)
    best = int(np.argmax(values))
    last = values[-min(STABILITY_EPOCHS, len(values)):]
    spread = max(last) - min(last)
    return {"best_epoch": steps[best], "best_val": values[best], "epochs": steps[-1], "spread": spread,
            "stable": spread <= STABLE_SPREAD, "train": history(client, run_id, "train/acc"), "val": list(val)}


def pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * float(value):.2f} %"


def seconds(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.3g}"


def stability_text(summary: dict) -> str:
    if not summary:
        return "–"
    n = min(STABILITY_EPOCHS, summary["epochs"])
    return f"{'yes' if summary['stable'] else 'no'} (spread {100 * summary['spread']:.1f} pp, last {n} epochs)"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Section:
    """One experiment's part of the report, and its line in the summary table."""

    found: Found
    body: str
    our_figure: str
    hardware: str
    setting: str
    missing: list[str] = dataclasses.field(default_factory=list)


class ReportWriter:
    """Builds the Markdown and the figures in ``out`` from the stores."""

    def __init__(self, out: Path, client: MlflowClient):
        self.out = out
        self.figures = out / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.client = client
        self._downloads = Path(tempfile.mkdtemp(prefix="scenesweep-report-"))

    def close(self) -> None:
        shutil.rmtree(self._downloads, ignore_errors=True)

    def figure_path(self, found: Found, name: str) -> Path:
        return self.figures / f"{found.experiment.name}_{name}"

    def link(self, path: Path, alt: str) -> str:
        return f"![{alt}]({path.relative_to(self.out).as_posix()})"

    def title_prefix(self, found: Found) -> str:
        return f"{DEMO_LABEL} (not 15-Scene): " if found.setting == "demo" else ""

    # -- describe (Q1) ---------------------------------------------------------------------
    def describe(self, found: Found) -> tuple[str, str, str]:
        run = found.run
        m = run.data.metrics
        total, weights, biases = (int(m.get(k, 0)) for k in ("params/total", "params/weights", "params/biases"))
        rows = [["total", f"{total:,}", found.experiment.reference.get("figure", "")],
                ["weights", f"{weights:,}", ""], ["biases", f"{biases:,}", ""]]
        if "params/torchvision_num_params" in m:
            rows.append(["torchvision's own count (`num_params`)", f"{int(m['params/torchvision_num_params']):,}", ""])
        body = [table(["parameters", "ours", "study"], rows)]
        layer_table = download(self.client, run.info.run_id, "layer_table.md", self._downloads / run.info.run_id)
        if layer_table is not None:
            text = layer_table.read_text().strip().splitlines()
            body.append("\n".join(line for line in text if not line.startswith("# ")).strip())
        our = f"{total:,} parameters ({weights:,} weights + {biases:,} biases)"
        return "\n\n".join(body), our, "counted from the architecture (no hardware dependence)"

    # -- imagenet (Q3) ---------------------------------------------------------------------
    def imagenet(self, found: Found) -> tuple[str, str, str]:
        run = found.run
        target = self._downloads / run.info.run_id
        predictions = download(self.client, run.info.run_id, "predictions.json", target)
        images = download(self.client, run.info.run_id, "images", target)
        if predictions is None:
            return "predictions.json is missing from the run.", "–", hardware_text(run.data.tags)
        records = json.loads(predictions.read_text())
        rows, tops = [], []
        for record in records:
            picture = ""
            if images is not None and (images / record["image"]).is_file():
                copy = self.figure_path(found, record["image"])
                shutil.copy2(images / record["image"], copy)
                picture = f'<img src="{copy.relative_to(self.out).as_posix()}" width="96">'
            names = "; ".join(f"{e['name']} ({e['index']}) {e['probability']:.3f}" for e in record["top"])
            rows.append([record["image"], picture, names])
            tops.append(f"{record['top'][0]['name']} ({record['top'][0]['probability']:.2f})")
        body = table(["image", "", f"top-{len(records[0]['top']) if records else 5}: class (index) probability"], rows)
        return body, "top-1: " + ", ".join(tops), hardware_text(run.data.tags)

    # -- featuremaps (Q4) ------------------------------------------------------------------
    def featuremaps(self, found: Found) -> tuple[str, str, str]:
        run = found.run
        folder = download(self.client, run.info.run_id, "featuremaps", self._downloads / run.info.run_id)
        if folder is None:
            return "The featuremaps/ artifacts are missing from the run.", "–", hardware_text(run.data.tags)
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        threshold = summary.get("threshold", run.data.params.get("option.threshold", "?"))
        lines = []
        # Per image: its raw maps, then the thresholded ones ('<image>_maps.png', '<image>_above_2.png').
        for png in sorted(folder.glob("*.png"), key=lambda p: (re.sub(r"_(maps|above_.*)$", "", p.stem),
                                                               "_above_" in p.name)):
            copy = self.figure_path(found, png.name)
            shutil.copy2(png, copy)
            lines.append(self.link(copy, png.stem))
        fraction = run.data.metrics.get("featuremaps/mean_active_fraction")
        maxima = ", ".join(f"{i['image']}: max {i['max_activation']:.2f}, "
                           f"{100 * i['mean_active_fraction']:.1f} % above {threshold}"
                           for i in summary.get("images", []))
        body = f"Threshold {threshold}. {maxima}\n\n" + "\n\n".join(lines)
        our = f"{len(summary.get('images', []))} image(s): {pct(fraction)} of map pixels above {threshold}"
        return body, our, hardware_text(run.data.tags)

    # -- a single run (Q12.2) --------------------------------------------------------------
    def single_run(self, found: Found) -> tuple[str, str, str]:
        run = found.run
        m = run.data.metrics
        epochs = epoch_summary(self.client, run.info.run_id)
        header = ["train acc", "val acc", "test acc", "best val acc (epoch)", "stable",
                  "s/batch extraction", "s/batch training", "study"]
        row = [pct(m.get("train/acc")), pct(m.get("val/acc")), pct(m.get("test/acc")),
               f"{pct(epochs.get('best_val'))} ({epochs.get('best_epoch', '–')})" if epochs else "–",
               stability_text(epochs), seconds(m.get("time/extract_batch_mean_s")),
               seconds(m.get("time/train_batch_mean_s")), found.experiment.reference.get("figure", "")]
        body = [table(header, [row])]
        if epochs:
            path = self.figure_path(found, "curves.png")
            self.curves({"": epochs}, path, f"{self.title_prefix(found)}{found.experiment.title}")
            body.append(self.link(path, "accuracy per epoch"))
        our = f"test {pct(m.get('test/acc'))}"
        if epochs:
            our += f"; best val {pct(epochs['best_val'])} at epoch {epochs['best_epoch']}"
        return "\n\n".join(body), our, hardware_text(run.data.tags)

    def curves(self, series: dict[str, dict], path: Path, title: str) -> None:
        """Train (dashed) and validation (solid) accuracy per epoch, one colour per series."""
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for index, (label, summary) in enumerate(series.items()):
            colour = f"C{index}"
            if summary.get("val"):
                ax.plot(*zip(*summary["val"]), "-", color=colour, label=f"{label} val".strip())
            if summary.get("train"):
                ax.plot(*zip(*summary["train"]), "--", color=colour, alpha=0.6, label=f"{label} train".strip())
        ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title=title)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    # -- a study (Q8/Q10, Q12.1, Q12.3) ----------------------------------------------------
    def study(self, found: Found) -> tuple[str, str, str, list[str]]:
        import optuna
        from optuna.trial import TrialState

        parent = found.run
        experiment = found.experiment
        tags = parent.data.tags
        study_name, storage = tags.get("study", ""), tags.get("optuna.storage", "")
        missing: list[str] = []
        try:
            if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
                raise FileNotFoundError(storage)
            study = optuna.load_study(study_name=study_name, storage=storage)
        except Exception as error:  # missing file, unknown study, unreachable server
            text = (f"The Optuna study `{study_name}` could not be read from `{storage}` "
                    f"({error.__class__.__name__}); best trial from the parent run: "
                    f"val {pct(parent.data.metrics.get('best/val/acc'))}, test {pct(parent.data.metrics.get('test/acc'))}.")
            return text, f"test {pct(parent.data.metrics.get('test/acc'))}", "not recorded", missing
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        runs = {}
        for trial in complete:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                try:
                    runs[trial.number] = self.client.get_run(run_id)
                except mlflow.exceptions.MlflowException:
                    pass
        space = [name for name in (complete[0].params if complete else {})]
        key = tags.get(TAG_TEST_PER) or experiment.options.get("test_per")
        best_run_id = tags.get("best_run_id")
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

        def test_acc(trial) -> float | None:
            run = runs.get(trial.number)
            if run is not None and "test/acc" in run.data.metrics:
                return run.data.metrics["test/acc"]
            if run is not None and run.info.run_id == best_run_id:
                return parent.data.metrics.get("test/acc")  # the study's one test evaluation
            return None

        # Best trial per group (or the best trial alone), with the study's columns.
        groups: dict[str, Any] = {}
        for trial in complete:
            group = str(trial.params.get(key)) if key else "best"
            if group not in groups or sign * trial.value > sign * groups[group].value:
                groups[group] = trial
        order = list(GROUP_ORDER.get(key, ()))
        ordered = sorted(groups.items(), key=lambda item: (
            order.index(item[0]) if item[0] in order else len(order),
            float(item[0]) if _is_number(item[0]) else 0.0, item[0]))
        references = experiment.reference.get("rows", {})
        header = [key or "trial", "trial", "params", "train acc", "val acc", "test acc", "best val acc (epoch)",
                  "stable", "s/batch extraction", "s/batch training", "study"]
        rows, series, figures = [], {}, []
        hardware = "not recorded"
        for group, trial in ordered:
            run = runs.get(trial.number)
            metrics = run.data.metrics if run else {}
            if run is not None and hardware == "not recorded":
                hardware = hardware_text(run.data.tags)
            epochs = epoch_summary(self.client, run.info.run_id) if run else {}
            if epochs:
                series[group] = epochs
            others = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items() if k != key)
            train_timing = (seconds(metrics.get("time/train_batch_mean_s")) if "time/train_batch_mean_s" in metrics
                            else (f"fit {seconds(metrics.get('time/train_fit_s'))} s" if "time/train_fit_s" in metrics
                                  else "–"))
            rows.append([group, f"#{trial.number}", others, pct(metrics.get("train/acc")), pct(trial.value),
                         pct(test_acc(trial)),
                         f"{pct(epochs['best_val'])} ({epochs['best_epoch']})" if epochs else "–",
                         stability_text(epochs), seconds(metrics.get("time/extract_batch_mean_s")), train_timing,
                         references.get(group, "")])
        for group in references:
            if group not in groups:
                missing.append(f"{experiment.question} {key}={group}: no completed trial in study `{study_name}`; "
                               f"run more trials: `{experiment.command(demo=found.setting == 'demo')} "
                               f"--n_trials {len(trials) + 4}`")
        body = [f"Optuna study `{study_name}` ({len(trials)} trials: "
                + ", ".join(f"{s.name.lower()} {n}" for s in TrialState
                            if (n := sum(t.state == s for t in trials))) + f"), storage `{storage}`."]
        if key:
            body.append(f"Best trial of each {key} by {tags.get('objective', 'val/acc')} (validation only); its test "
                        "accuracy computed once, after selection. Extraction seconds per batch were measured when the "
                        "convolutional features were computed (feature cache).")
        body.append(table(header, rows))
        numeric = [name for name in space if all(_is_number(t.params.get(name)) for t in complete)
                   and not isinstance(complete[0].params.get(name), bool)]
        if complete and numeric:
            path = self.figure_path(found, "accuracy_vs_params.png")
            self.scatter(complete, numeric, key if key and key not in numeric else None,
                         {t.number: test_acc(t) for t in complete}, path,
                         f"{self.title_prefix(found)}{experiment.title}")
            figures.append(self.link(path, "validation accuracy against the searched parameters"))
        if series:
            path = self.figure_path(found, "curves.png")
            self.curves(series, path, f"{self.title_prefix(found)}{experiment.title}: best trial of each {key}")
            figures.append(self.link(path, "accuracy per epoch"))
        body += figures
        body.append("<details><summary>All trials</summary>\n\n" + table(
            ["trial", "state", "params", "val acc"],
            [[f"#{t.number}", t.state.name.lower(), ", ".join(f"{k}={_short(v)}" for k, v in t.params.items()),
              pct(t.value) if t.value is not None else "–"] for t in trials]) + "\n\n</details>")
        our = "; ".join(f"{g}: test {pct(test_acc(t))} (val {pct(t.value)})" for g, t in ordered) or "no completed trial"
        return "\n\n".join(body), our, hardware, missing

    def scatter(self, trials: list, numeric: list[str], colour_by: str | None, tests: dict[int, float | None],
                path: Path, title: str) -> None:
        """Validation accuracy (dots) and test accuracy of the evaluated trials (stars) against
        each numeric searched parameter; log axes where the values span more than 20x."""
        fig, axes = plt.subplots(1, len(numeric), figsize=(5.5 * len(numeric), 4.2), squeeze=False)
        groups = sorted({str(t.params.get(colour_by)) for t in trials}) if colour_by else [""]
        order = list(GROUP_ORDER.get(colour_by or "", ()))
        groups.sort(key=lambda g: order.index(g) if g in order else len(order))
        for ax, name in zip(axes[0], numeric):
            for index, group in enumerate(groups):
                members = [t for t in trials if not colour_by or str(t.params.get(colour_by)) == group]
                x = [float(t.params[name]) for t in members]
                ax.scatter(x, [t.value for t in members], color=f"C{index}", alpha=0.7,
                           label=f"{colour_by}={group} val" if colour_by else "val")
                tested = [(float(t.params[name]), tests[t.number]) for t in members if tests.get(t.number) is not None]
                if tested:
                    ax.scatter(*zip(*tested), color=f"C{index}", marker="*", s=160, edgecolor="black",
                               label=f"{colour_by}={group} test" if colour_by else "test")
            values = [float(t.params[name]) for t in trials]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
            ax.set(xlabel=name, ylabel="accuracy", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    # -- assembling --------------------------------------------------------------------------
    def section(self, found: Found) -> Section:
        experiment = found.experiment
        missing = []
        if found.setting != "real":
            missing.append(f"{experiment.question} {experiment.title} on 15-Scene: `{experiment.command()}`")
        if found.run is None:
            missing.append(f"{experiment.question} {experiment.title}, demo: `{experiment.command(demo=True)}`")
            return Section(found, "No finished run: see *Missing runs*.", "missing", "–", "–", missing)
        kind = experiment.kind
        if kind == "study":
            body, our, hardware, more = self.study(found)
            missing += more
        elif kind == "run":
            body, our, hardware = self.single_run(found)
        else:
            body, our, hardware = getattr(self, kind)(found)
        run = found.run
        params = run_params(run)
        setting = setting_text(found, params)
        header = [f"Setting: {setting}.",
                  f"Run: `{run.info.run_id}` ({run.info.run_name}), finished "
                  f"{_when(run.info.end_time)}; command: `{run.data.tags.get('scenesweep.command') or experiment.command()}`.",
                  f"Measured on: {hardware}.",
                  f"Study's figure: {experiment.reference.get('figure') or '–'}."]
        if found.other is not None:
            header.append(f"(A demo run also exists: `{found.other.info.run_id}`; not shown.)")
        return Section(found, "\n".join(f"- {h}" for h in header) + "\n\n" + body, our, hardware,
                       "DEMO" if found.setting == "demo" else "real", missing)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _when(milliseconds: int | None) -> str:
    if not milliseconds:
        return "?"
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M")


@dataclasses.dataclass
class Report:
    """What ``build_report`` wrote: the Markdown file, the run it was logged in, the sections."""

    path: Path
    run_id: str
    sections: list[Section]
    missing: list[str]


def build_report(out: str | Path = "reports/latest", experiments_dir: str | Path | None = None,
                 log: bool = True) -> Report:
    """Write ``out/report.md`` and ``out/figures/*.png`` and log the folder in a ``report`` run.

    Args:
        out: the report folder (replaced).
        experiments_dir: where the experiment files are (default: the project's experiments/).
        log: also log the folder as artifacts of a new MLflow run in experiment "report".
    """
    out = Path(out)
    if out.exists():
        # Replace an earlier report only: never wipe a folder that holds something else.
        if not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file()):
            raise UserError(f"--out {out}: exists and is not a report folder (no report.md); "
                            "choose a new or an earlier report's folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tracking.setup_tracking()
    client = MlflowClient()
    experiment_ids = _all_experiment_ids(client)
    experiments = [load_experiment(p) for p in experiment_files(experiments_dir)]
    writer = ReportWriter(out, client)
    try:
        sections = [writer.section(find_runs(client, e, experiment_ids)) for e in experiments]
    finally:
        writer.close()
    missing = [line for s in sections for line in s.missing]
    markdown = render(sections, missing)
    path = out / "report.md"
    path.write_text(markdown)
    run_id = ""
    if log:
        with tracking.start_run(REPORT_EXPERIMENT, "report", tags={"scenesweep.report": "true",
                                                                    "command": tracking.command_line()},
                                system_metrics=False) as run:
            run_id = run.info.run_id
            mlflow.log_artifacts(str(out), "report")
            tracking.log_batch(run_id, metrics={"report/experiments": len(sections),
                                                "report/real": sum(s.setting == "real" for s in sections),
                                                "report/demo": sum(s.setting == "DEMO" for s in sections),
                                                "report/missing": len(missing)})
    return Report(path, run_id, sections, missing)


def render(sections: list[Section], missing: list[str]) -> str:
    """The Markdown: summary table, missing runs, one section per experiment."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = ["# Our figures beside the reference study's", "",
             f"Generated {now} from the tracking store `{mlflow.get_tracking_uri()}` and the Optuna storages its "
             "sweep runs name. The study: VGG16 (ImageNet weights) on 15-Scene, 100 training images per class, "
             "224 px, mini-batches of 8 (see `reference/`).", "",
             f"**{DEMO_LABEL}** marks demo figures (scikit-learn digits and/or random VGG16 weights, small images): "
             "they check the pipeline, and are never 15-Scene results. Unlike the study, selection (C, epochs, "
             "pooling settings) reads a validation split carved from the training images; test accuracy is "
             "computed once, after selection.", "",
             "## Summary", "",
             table(["#", "experiment", "study's figure", "our figure", "setting", "measured on"],
                   [[s.found.experiment.question, s.found.experiment.title,
                     s.found.experiment.reference.get("figure", "") or "–", s.our_figure,
                     f"**{s.setting}**" if s.setting == DEMO_LABEL else s.setting, s.hardware]
                    for s in sections]), "",
             "## Missing runs", ""]
    lines += [f"- {m}" for m in missing] or ["None: every experiment has a finished run on the real setting."]
    lines.append("")
    for s in sections:
        experiment = s.found.experiment
        label = f" ({DEMO_LABEL} figures)" if s.setting == DEMO_LABEL else ""
        lines += [f"## {experiment.question}: {experiment.title}{label}", "",
                  f"{experiment.description}" if experiment.description else "",
                  f"File `{experiment.display_path()}`.", "", s.body, ""]
    return "\n".join(lines) + "\n"
