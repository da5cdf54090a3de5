"""One function per kind of section: each turns an experiment's runs into its part of the report.

  * ``describe`` (Q1): the parameter table and its totals;
  * ``imagenet`` (Q3): the top classes of each image;
  * ``featuremaps`` (Q4): the grids of maps, raw and thresholded;
  * a single ``run`` (Q12.2): train, validation and test accuracy, the epoch of the best
    validation accuracy, stability, seconds per batch, and the curves per epoch;
  * a ``study`` (Q8/Q10, Q12.1, Q12.3): every trial (read from the Optuna storage), the best
    trial of each value of the file's ``test_per`` key with the same columns, accuracy against
    each numeric dimension of the search space (e.g. C), and the curves per epoch.

Each returns (body, our figure, measured on, missing runs).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..core.store_urls import sqlite_path
from ..search.trials import USER_ATTR_RUN_ID, best_per_group, state_counts
from ..specs.experiments import TAG_TEST_PER
from ..tracking import plots
from .finding import Found
from .reading import (DEMO_LABEL, GROUP_ORDER, download, epoch_summary, extraction_batch_s, extraction_images_per_s,
                      hardware_text, is_number,
                      pct, run_params, seconds, setting_text, short, stability_text, table, when)

SectionParts = tuple[str, str, str, list[str]]  # body, our figure, measured on, missing runs


@dataclasses.dataclass
class Page:
    """Where a report is written (``out``, its ``figures/``) and where runs' artifacts are copied."""

    out: Path
    client: MlflowClient
    downloads: Path

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def figure_path(self, found: Found, name: str) -> Path:
        return self.figures / f"{found.experiment.name}_{name}"

    def link(self, path: Path, alt: str) -> str:
        return f"![{alt}]({path.relative_to(self.out).as_posix()})"

    def artifact(self, run, path: str) -> Path | None:
        return download(run.info.run_id, path, self.downloads / run.info.run_id)


def title_prefix(found: Found) -> str:
    return f"{DEMO_LABEL} (not 15-Scene): " if found.setting == "demo" else ""


def history_of(summary: dict) -> list[dict]:
    """An ``epoch_summary``'s (step, value) series as per-epoch dicts, for ``plots.curves_figure``."""
    epochs: dict[int, dict] = {}
    for split in ("train", "val"):
        for step, value in summary.get(split, []):
            epochs.setdefault(step, {"epoch": step})[f"{split}/acc"] = value
    return [epochs[step] for step in sorted(epochs)]


def _curves(page: Page, found: Found, series: dict[str, dict], title: str) -> str:
    path = page.figure_path(found, "curves.png")
    plots.save_figure(plots.curves_figure({k: history_of(v) for k, v in series.items()}, title), path)
    return page.link(path, "accuracy per epoch")


def describe(page: Page, found: Found) -> SectionParts:
    run = found.run
    m = run.data.metrics
    total, weights, biases = (int(m.get(k, 0)) for k in ("params/total", "params/weights", "params/biases"))
    rows = [["total", f"{total:,}", found.experiment.reference.get("figure", "")],
            ["weights", f"{weights:,}", ""], ["biases", f"{biases:,}", ""]]
    if "params/torchvision_num_params" in m:
        rows.append(["torchvision's own count (`num_params`)", f"{int(m['params/torchvision_num_params']):,}", ""])
    body = [table(["parameters", "ours", "study"], rows)]
    layer_table = page.artifact(run, "layer_table.md")
    if layer_table is not None:
        text = layer_table.read_text().strip().splitlines()
        body.append("\n".join(line for line in text if not line.startswith("# ")).strip())
    our = f"{total:,} parameters ({weights:,} weights + {biases:,} biases)"
    return "\n\n".join(body), our, "counted from the architecture (no hardware dependence)", []


def imagenet(page: Page, found: Found) -> SectionParts:
    run = found.run
    predictions, images = page.artifact(run, "predictions.json"), page.artifact(run, "images")
    if predictions is None:
        return "predictions.json is missing from the run.", "–", hardware_text(run.data.tags), []
    records = json.loads(predictions.read_text())
    rows, tops = [], []
    for record in records:
        picture = ""
        if images is not None and (images / record["image"]).is_file():
            copy = page.figure_path(found, record["image"])
            shutil.copy2(images / record["image"], copy)
            picture = f'<img src="{copy.relative_to(page.out).as_posix()}" width="96">'
        names = "; ".join(f"{e['name']} ({e['index']}) {e['probability']:.3f}" for e in record["top"])
        rows.append([record["image"], picture, names])
        tops.append(f"{record['top'][0]['name']} ({record['top'][0]['probability']:.2f})")
    body = table(["image", "", f"top-{len(records[0]['top']) if records else 5}: class (index) probability"], rows)
    return body, "top-1: " + ", ".join(tops), hardware_text(run.data.tags), []


def featuremaps(page: Page, found: Found) -> SectionParts:
    run = found.run
    folder = page.artifact(run, "featuremaps")
    if folder is None:
        return "The featuremaps/ artifacts are missing from the run.", "–", hardware_text(run.data.tags), []
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    threshold = summary.get("threshold", run.data.params.get("option.threshold", "?"))
    lines = []
    # Per image: its raw maps, then the thresholded ones ('<image>_maps.png', '<image>_above_2.png').
    for png in sorted(folder.glob("*.png"), key=lambda p: (re.sub(r"_(maps|above_.*)$", "", p.stem),
                                                           "_above_" in p.name)):
        copy = page.figure_path(found, png.name)
        shutil.copy2(png, copy)
        lines.append(page.link(copy, png.stem))
    fraction = run.data.metrics.get("featuremaps/mean_active_fraction")
    maxima = ", ".join(f"{i['image']}: max {i['max_activation']:.2f}, "
                       f"{100 * i['mean_active_fraction']:.1f} % above {threshold}"
                       for i in summary.get("images", []))
    body = f"Threshold {threshold}. {maxima}\n\n" + "\n\n".join(lines)
    our = f"{len(summary.get('images', []))} image(s): {pct(fraction)} of map pixels above {threshold}"
    return body, our, hardware_text(run.data.tags), []


def single_run(page: Page, found: Found) -> SectionParts:
    run = found.run
    m = run.data.metrics
    epochs = epoch_summary(page.client, run.info.run_id)
    header = ["train acc", "val acc", "test acc", "best val acc (epoch)", "stable",
              "s/batch extraction", "s/batch training", "study"]
    row = [pct(m.get("train/acc")), pct(m.get("val/acc")), pct(m.get("test/acc")),
           f"{pct(epochs.get('best_val'))} ({epochs.get('best_epoch', '–')})" if epochs else "–",
           stability_text(epochs), seconds(extraction_batch_s(run)),
           seconds(m.get("time/train_batch_mean_s")), found.experiment.reference.get("figure", "")]
    body = [table(header, [row])]
    if epochs:
        body.append(_curves(page, found, {"": epochs}, f"{title_prefix(found)}{found.experiment.title}"))
    our = f"test {pct(m.get('test/acc'))}"
    if epochs:
        our += f"; best val {pct(epochs['best_val'])} at epoch {epochs['best_epoch']}"
    return "\n\n".join(body), our, hardware_text(run.data.tags), []


@dataclasses.dataclass
class StudyView:
    """A study as the report reads it: its trials, their runs, and how to find test accuracy."""

    study: optuna.Study
    trials: list
    complete: list
    runs: dict[int, Any]
    parent: Any
    key: str | None

    def test_acc(self, trial) -> float | None:
        run = self.runs.get(trial.number)
        if run is not None and "test/acc" in run.data.metrics:
            return run.data.metrics["test/acc"]
        if run is not None and run.info.run_id == self.parent.data.tags.get("best_run_id"):
            return self.parent.data.metrics.get("test/acc")  # the study's one test evaluation
        return None


def _load_study(page: Page, found: Found) -> StudyView:
    tags = found.run.data.tags
    study_name, storage = tags.get("study", ""), tags.get("optuna.storage", "")
    database = sqlite_path(storage)
    if database is not None and not database.is_file():
        raise FileNotFoundError(storage)
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    runs = {}
    for trial in complete:
        if trial.user_attrs.get(USER_ATTR_RUN_ID):
            try:
                runs[trial.number] = page.client.get_run(trial.user_attrs[USER_ATTR_RUN_ID])
            except mlflow.exceptions.MlflowException:
                pass
    return StudyView(study, trials, complete, runs, found.run, tags.get(TAG_TEST_PER) or found.experiment.options.get("test_per"))


def _ordered_groups(view: StudyView) -> list[tuple[str, Any]]:
    """The best trial of each group, in the registries' order (then numerically)."""
    groups = best_per_group(view.complete, view.key, view.study.direction)
    order = list(GROUP_ORDER.get(view.key, ()))
    return sorted(groups.items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order),
        float(item[0]) if is_number(item[0]) else 0.0, item[0]))


def _group_row(page: Page, view: StudyView, group: str, trial, references: dict) -> tuple[list, dict]:
    run = view.runs.get(trial.number)
    metrics = run.data.metrics if run else {}
    epochs = epoch_summary(page.client, run.info.run_id) if run else {}
    others = ", ".join(f"{k}={short(v)}" for k, v in trial.params.items() if k != view.key)
    train_timing = (seconds(metrics.get("time/train_batch_mean_s")) if "time/train_batch_mean_s" in metrics
                    else (f"fit {seconds(metrics.get('time/train_fit_s'))} s" if "time/train_fit_s" in metrics
                          else "–"))
    row = [group, f"#{trial.number}", others, pct(metrics.get("train/acc")), pct(trial.value),
           pct(view.test_acc(trial)), f"{pct(epochs['best_val'])} ({epochs['best_epoch']})" if epochs else "–",
           stability_text(epochs), seconds(extraction_batch_s(run) if run else None), train_timing,
           references.get(group, "")]
    return row, epochs


def _study_figures(page: Page, found: Found, view: StudyView, series: dict) -> list[str]:
    figures = []
    space = list(view.complete[0].params) if view.complete else []
    numeric = [name for name in space if all(is_number(t.params.get(name)) for t in view.complete)
               and not isinstance(view.complete[0].params.get(name), bool)]
    title = f"{title_prefix(found)}{found.experiment.title}"
    if view.complete and numeric:
        path = page.figure_path(found, "accuracy_vs_params.png")
        plots.save_figure(scatter_figure(view.complete, numeric, view.key if view.key not in numeric else None,
                                         {t.number: view.test_acc(t) for t in view.complete}, title), path)
        figures.append(page.link(path, "validation accuracy against the searched parameters"))
    if series:
        figures.append(_curves(page, found, series, f"{title}: best trial of each {view.key}"))
    return figures


def study(page: Page, found: Found) -> SectionParts:
    experiment, tags = found.experiment, found.run.data.tags
    try:
        view = _load_study(page, found)
    except Exception as error:  # missing file, unknown study, unreachable server
        metrics = found.run.data.metrics
        text = (f"The Optuna study `{tags.get('study', '')}` could not be read from `{tags.get('optuna.storage', '')}` "
                f"({error.__class__.__name__}); best trial from the parent run: "
                f"val {pct(metrics.get('best/val/acc'))}, test {pct(metrics.get('test/acc'))}.")
        return text, f"test {pct(metrics.get('test/acc'))}", "not recorded", []
    ordered = _ordered_groups(view)
    references = experiment.reference.get("rows", {})
    rows, series, hardware = [], {}, "not recorded"
    for group, trial in ordered:
        row, epochs = _group_row(page, view, group, trial, references)
        rows.append(row)
        if epochs:
            series[group] = epochs
        if trial.number in view.runs and hardware == "not recorded":
            hardware = hardware_text(view.runs[trial.number].data.tags)
    missing = [f"{experiment.question} {view.key}={group}: no completed trial in study `{view.study.study_name}`; "
               f"run more trials: `{experiment.command(demo=found.setting == 'demo')} --n_trials {len(view.trials) + 4}`"
               for group in references if group not in dict(ordered)]
    body = [f"Optuna study `{view.study.study_name}` ({len(view.trials)} trials: "
            + ", ".join(f"{name.lower()} {n}" for name, n in state_counts(view.trials).items() if n)
            + f"), storage `{tags.get('optuna.storage', '')}`."]
    if view.key:
        body.append(f"Best trial of each {view.key} by {tags.get('objective', 'val/acc')} (validation only); its test "
                    "accuracy computed once, after selection. Extraction seconds per batch were measured when the "
                    "convolutional features were computed (feature cache).")
    body.append(table([view.key or "trial", "trial", "params", "train acc", "val acc", "test acc",
                       "best val acc (epoch)", "stable", "s/batch extraction", "s/batch training", "study"], rows))
    if view.key == "arch":
        body.append(_backbone_table(view, ordered))
    body += _study_figures(page, found, view, series)
    body.append("<details><summary>All trials</summary>\n\n" + table(
        ["trial", "state", "params", "val acc"],
        [[f"#{t.number}", t.state.name.lower(), ", ".join(f"{k}={short(v)}" for k, v in t.params.items()),
          pct(t.value) if t.value is not None else "–"] for t in view.trials]) + "\n\n</details>")
    our = "; ".join(f"{g}: test {pct(view.test_acc(t))} (val {pct(t.value)})" for g, t in ordered) or "no completed trial"
    return "\n\n".join(body), our, hardware, missing


KORNBLITH = ("Kornblith, Shlens and Le (CVPR 2019) found that with fixed ImageNet features and a linear "
             "classifier, transfer accuracy rises with ImageNet top-1 accuracy (r = 0.99 over 16 networks, 12 "
             "datasets); the column *ImageNet top-1* is torchvision's figure for each network's IMAGENET1K_V1 "
             "weights, to set the transfer accuracies against.")


def _backbone_table(view: StudyView, ordered: list[tuple[str, Any]]) -> str:
    """A study over backbones (``test_per: arch``): one row per backbone, what it costs and gives."""
    rows = []
    for arch, trial in ordered:
        run = view.runs.get(trial.number)
        params = run.data.params if run else {}
        width = params.get("backbone.feature_dim")
        count = params.get("backbone.params")
        speed = extraction_images_per_s(run) if run else None
        rows.append([arch, params.get("backbone.family", "–"), f"{int(count) / 1e6:.1f} M" if count else "–",
                     f"{params.get('layer', '–')} ({width})" if width else params.get("layer", "–"),
                     f"{float(params['backbone.imagenet_top1']):.2f} %" if "backbone.imagenet_top1" in params else "–",
                     f"{speed:.0f}" if speed else "–", pct(trial.value), pct(view.test_acc(trial))])
    return ("Backbones side by side (the best trial of each; images/s of the extraction on the machine named "
            f"above; test accuracy computed once per backbone). {KORNBLITH}\n\n"
            + table(["backbone", "family", "parameters", "features (width)", "ImageNet top-1",
                     "extraction images/s", "val acc", "test acc"], rows))


def scatter_figure(trials: list, numeric: list[str], colour_by: str | None, tests: dict[int, float | None],
                   title: str):
    """Validation accuracy (dots) and test accuracy of the evaluated trials (stars) against
    each numeric searched parameter; log axes where the values span more than 20x."""
    fig, axes = plt.subplots(1, len(numeric), figsize=(5.5 * len(numeric), 4.2), squeeze=False)
    groups = sorted({str(t.params.get(colour_by)) for t in trials}) if colour_by else [""]
    order = list(GROUP_ORDER.get(colour_by or "", ()))
    groups.sort(key=lambda g: order.index(g) if g in order else len(order))
    for ax, name in zip(axes[0], numeric):
        for index, group in enumerate(groups):
            members = [t for t in trials if not colour_by or str(t.params.get(colour_by)) == group]
            ax.scatter([float(t.params[name]) for t in members], [t.value for t in members], color=f"C{index}",
                       alpha=0.7, label=f"{colour_by}={group} val" if colour_by else "val")
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
    return fig


# The section of each kind of experiment (``Experiment.kind``).
SECTIONS: dict[str, Callable[[Page, Found], SectionParts]] = {
    "describe": describe, "imagenet": imagenet, "featuremaps": featuremaps, "run": single_run, "study": study}


@dataclasses.dataclass
class Section:
    """One experiment's part of the report, and its line in the summary table."""

    found: Found
    body: str
    our_figure: str
    hardware: str
    setting: str
    missing: list[str] = dataclasses.field(default_factory=list)


def section(page: Page, found: Found) -> Section:
    """The experiment's section: its header (setting, run, hardware, the study's figure) and body."""
    experiment = found.experiment
    missing = []
    if found.setting != "real":
        missing.append(f"{experiment.question} {experiment.title} on 15-Scene: `{experiment.command()}`")
    if found.run is None:
        missing.append(f"{experiment.question} {experiment.title}, demo: `{experiment.command(demo=True)}`")
        return Section(found, "No finished run: see *Missing runs*.", "missing", "–", "–", missing)
    body, our, hardware, more = SECTIONS[experiment.kind](page, found)
    run = found.run
    header = [f"Setting: {setting_text(found, run_params(run))}.",
              f"Run: `{run.info.run_id}` ({run.info.run_name}), finished {when(run.info.end_time)}; "
              f"command: `{run.data.tags.get('scenesweep.command') or experiment.command()}`.",
              f"Measured on: {hardware}.",
              f"Study's figure: {experiment.reference.get('figure') or '–'}."]
    if found.other is not None:
        header.append(f"(A demo run also exists: `{found.other.info.run_id}`; not shown.)")
    return Section(found, "\n".join(f"- {h}" for h in header) + "\n\n" + body, our, hardware,
                   "DEMO" if found.setting == "demo" else "real", missing + more)
