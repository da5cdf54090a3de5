"""The experiments that are neither a study nor a single run: the parameter table (Q1), the
ImageNet classes of given images (Q3) and the maps of the first convolution (Q4). Each is one
tracked run with its artifacts (tables, images, figures)."""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mlflow
import torchvision

from ..compute.backbone import setting_layer_table
from ..compute.featuremaps import first_conv_maps
from ..compute.hardware import resolve_device
from ..compute.imagenet import top_classes
from ..specs.plans import Plan
from ..tracking import lifecycle, plots, sink


@dataclasses.dataclass
class Outcome:
    """What a run of an experiment produced: its main MLflow run and lines to print."""

    run_id: str
    lines: list[str]


def _hardware_tags(device: str) -> dict[str, str]:
    return sink.hardware_tags(str(resolve_device(device)))


def _log_params(run_id: str, plan_: Plan, names: tuple[str, ...]) -> None:
    sink.log_batch(run_id, params={**{n: plan_.config.values[n] for n in names},
                                       **{f"option.{k}": v for k, v in plan_.options.items()}})


def run_describe(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q1: the layer table and parameter counts, from the architecture alone (no weights)."""
    config = plan_.config
    with lifecycle.start_run("describe", f"{plan_.experiment.name} {config.arch}", tags=plan_.tags(),
                            system_metrics=False) as active:
        run_id = active.info.run_id
        _log_params(run_id, plan_, ("arch", "pooling", "fc_width", "image_size", "weights"))
        rows = setting_layer_table(config)
        weights = sum(r.weights for r in rows)
        biases = sum(r.biases for r in rows)
        metrics = {"params/total": weights + biases, "params/weights": weights, "params/biases": biases,
                   "params/conv": sum(r.weights + r.biases for r in rows if r.kind == "Convolution"),
                   "params/fc": sum(r.weights + r.biases for r in rows if r.kind == "Fully connected")}
        tags = {}
        if config.pooling == "max" and config.fc_width == 4096:
            # torchvision's weights enum carries its own count: nothing hand-copied.
            meta = torchvision.models.get_model_weights(config.arch).IMAGENET1K_V1.meta
            metrics["params/torchvision_num_params"] = meta["num_params"]
            tags["params.matches_torchvision"] = str(meta["num_params"] == weights + biases).lower()
        sink.log_batch(run_id, metrics=metrics, tags=tags)
        table = sink.log_layer_table(run_id, config, rows)
        mlflow.log_dict([dataclasses.asdict(r) for r in rows], "layer_table.json")
    lines = [table, f"run {run_id}: {weights + biases:,} parameters ({weights:,} weights + {biases:,} biases)"]
    return Outcome(run_id, lines)


def _log_images(paths: tuple[Path, ...]) -> list[str]:
    """The input images as artifacts ``images/NN_<class>_<name>``; returns their names."""
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, path in enumerate(paths):
            # Prefixed with the index and the class folder: 15-Scene names repeat across classes.
            name = f"{index:02d}_{path.parent.name}_{path.name}"
            (Path(tmp) / name).write_bytes(path.read_bytes())
            names.append(name)
        mlflow.log_artifacts(tmp, "images")
    return names


@contextlib.contextmanager
def _image_run(plan_: Plan, experiment: str, what: str) -> Iterator[tuple[str, list[str]]]:
    """A run of an experiment on given images (Q3, Q4): its params, hardware and the images
    logged; yields (run id, the images' artifact names)."""
    with lifecycle.start_run(experiment, f"{plan_.experiment.name} {what}",
                         tags={**plan_.tags(), **_hardware_tags(plan_.config.device)}, system_metrics=False) as active:
        _log_params(active.info.run_id, plan_, ("weights", "arch", "image_size", "seed"))
        yield active.info.run_id, _log_images(plan_.images)


def run_imagenet(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q3: the top ImageNet classes of each image, with the 1000-class head."""
    config, top = plan_.config, plan_.options["top"]
    with _image_run(plan_, "imagenet", f"top-{top}") as (run_id, names):
        began = time.perf_counter()
        predictions = top_classes([str(p) for p in plan_.images], weights=config.weights, arch=config.arch,
                                  image_size=config.image_size, top=top, seed=config.seed)
        seconds = time.perf_counter() - began
        records = [{"image": name, "path": str(path),
                    "top": [{"rank": rank, "index": int(index), "name": label, "probability": float(prob)}
                            for rank, (index, label, prob) in enumerate(ranked, start=1)]}
                   for name, path, ranked in zip(names, plan_.images, predictions)]
        mlflow.log_dict(records, "predictions.json")
        table = format_predictions(records)
        mlflow.log_text(table + "\n", "predictions.md")
        sink.log_batch(run_id, metrics={"time/predict_s": seconds, "images": len(records),
                                            **{f"top1_probability/{i:02d}": r["top"][0]["probability"]
                                               for i, r in enumerate(records)}})
    return Outcome(run_id, [table, f"run {run_id}: top-{top} ImageNet classes of {len(records)} image(s)"])


def format_predictions(records: list[dict]) -> str:
    """Markdown: one row per image and rank."""
    lines = ["| image | rank | class | name | probability |", "|---|---|---|---|---|"]
    for record in records:
        for entry in record["top"]:
            lines.append(f"| {record['image'] if entry['rank'] == 1 else ''} | {entry['rank']} | {entry['index']} | "
                         f"{entry['name']} | {entry['probability']:.4f} |")
    return "\n".join(lines)


def run_featuremaps(plan_: Plan, progress: bool, register: bool) -> Outcome:
    """Q4: the 64 maps after conv1_1 + ReLU, raw and thresholded, for each image."""
    config, threshold = plan_.config, plan_.options["threshold"]
    with _image_run(plan_, "featuremaps", "conv1_1") as (run_id, names):
        result = first_conv_maps(plan_.images, weights=config.weights, arch=config.arch,
                                 image_size=config.image_size, threshold=threshold, seed=config.seed,
                                 device=config.device)
        active_fraction = result.active_fraction()  # (N, 64)
        files = []
        for index, name in enumerate(names):
            stem = Path(name).stem
            for suffix, maps, binary, what in (
                    ("maps", result.maps[index], False, "ReLU(conv1_1), 64 maps"),
                    (f"above_{threshold:g}", result.thresholded[index], True, f"maps > {threshold:g}")):
                path = f"featuremaps/{stem}_{suffix}.png"
                plots.log_figure(plots.featuremap_figure(result.inputs[index], maps, f"{name}: {what}", binary),
                                 path, run_id)
                files.append(path)
        summary = [{"image": name, "max_activation": float(result.maps[i].max()),
                    "mean_active_fraction": float(active_fraction[i].mean()),
                    "active_fraction_per_map": [round(float(v), 5) for v in active_fraction[i]]}
                   for i, name in enumerate(names)]
        mlflow.log_dict({"threshold": threshold, "shape": list(result.maps.shape), "images": summary},
                        "featuremaps/summary.json")
        sink.log_batch(run_id, metrics={"featuremaps/mean_active_fraction": float(active_fraction.mean()),
                                            "featuremaps/max_activation": float(result.maps.max())})
    lines = [f"run {run_id}: {len(names)} image(s), maps {tuple(result.maps.shape[1:])} each; "
             f"{100 * active_fraction.mean():.1f} % of map pixels above {threshold:g}",
             *[f"  artifact {f}" for f in files]]
    return Outcome(run_id, lines)
