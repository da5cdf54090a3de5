"""Registry and inference commands: ``scenesweep promote`` and ``scenesweep predict``.

``predict`` runs a logged model exactly as ``mlflow models serve`` does: it loads the pyfunc
and calls ``predict`` on a table with a column ``image`` of base64-encoded file bytes.
Heavy imports (MLflow, torch) happen inside the commands, so ``scenesweep --help`` stays quick.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import click

from ..core.config import REGISTERED_MODEL
from ..core.errors import UserError, first_line
from ..core.store_urls import sqlite_path
from .group import main, option, clean_exit

DEFAULT_MODEL_URI = f"models:/{REGISTERED_MODEL}@champion"


@main.command("promote")
@click.option("--name", default=REGISTERED_MODEL, show_default=True, help="registered model name")
@click.option("--metric", default="val/acc", show_default=True,
              help="what to rank versions by: a metric of their MLflow model records (val/acc, test/acc, "
                   "test/f1_macro, test/acc_balanced: higher is better; val/loss, test/loss: lower), searched "
                   "in every experiment, or a version tag (val_acc, test_acc, val_loss)")
@click.option("--where", default="", metavar="FILTER",
              help="only versions whose model record matches this mlflow.search_logged_models filter, "
                   "e.g. \"params.layer = 'relu7'\" or \"tags.study IN ('a', 'b')\"")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[true|false]",
              help="move the alias even when the candidate does not beat the champion "
                   "(`--force` alone means true)")
@click.option("--version", "version", default=None, metavar="N",
              help="promote this version instead of the best one by the metric")
@clean_exit
def promote(name: str, metric: str, where: str, force: bool, version: str | None) -> None:
    """Move the alias @champion to the best registered version if it beats the current champion.

    The best version is the one whose model record has the best METRIC (or, for a tag name, the
    best version tag), among the records matching --where; it must beat the champion strictly,
    on the same dataset, unless --force. Prints what was done and why.
    """
    from ..models.promotion import promote as promote_version

    _use_project_store()
    click.echo(promote_version(name, metric, force=force, version=version or None, where=where.strip() or None).message)


def _use_project_store() -> None:
    """MLFLOW_TRACKING_URI when set (MLflow reads it), else the project's store under mlruns/.

    ``scenesweep.tracking.mlflow_store`` imports MLflow (a second): only when the default store
    is needed or a SQLite store does not exist yet (its ``setup_tracking`` creates it properly).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    database = sqlite_path(uri)
    if not uri or database is not None and not database.exists():
        from ..tracking.mlflow_store import setup_tracking

        setup_tracking()


def _image_files(images: tuple[str, ...]) -> list[Path]:
    if not images:
        raise UserError("no IMAGE given: pass one or more image files, e.g. scenesweep predict photo.jpg")
    paths = [Path(p) for p in images]
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path}: is a folder; pass image files (e.g. {path}/*.jpg)")
        if not path.is_file():
            raise UserError(f"{path}: image file not found")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file (0 bytes); expected an image file")
    return paths


def _load_model(model_uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    _use_project_store()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        hint = ("; promote a version first: scenesweep promote" if "@champion" in model_uri else "")
        raise UserError(f"--model-uri={model_uri}: cannot load it ({first_line(error)}){hint}") from None
    except OSError as error:
        raise UserError(f"--model-uri={model_uri}: cannot load it ({error})") from None


def _classify(paths: list[Path], model_uri: str) -> list[dict]:
    """Each file through the model's predict, the same call the REST server makes."""
    import pandas as pd

    from ..models.pyfunc import IMAGE_COLUMN, InputError

    model = _load_model(model_uri)
    table = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]})
    try:
        predictions = model.predict(table)
    except InputError as error:
        # The model names the row; the user named a file.
        raise UserError(f"{paths[error.row]}: {error.reason}" if error.row is not None else str(error)) from None
    score_columns = [c for c in predictions.columns if c.startswith("score_")]
    rows = []
    for path, (_, prediction) in zip(paths, predictions.iterrows()):
        scores = {c[len("score_"):]: float(prediction[c]) for c in score_columns}
        rows.append({"file": str(path), "label": str(prediction["label"]),
                     "class_index": int(prediction["class_index"]), "score": scores[str(prediction["label"])],
                     "scores": scores})
    return rows


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@main.command("predict")
@click.argument("images", nargs=-1, metavar="IMAGE...")
@option("model_uri", default=DEFAULT_MODEL_URI, show_default=True,
        help="any MLflow model URI of a scenesweep image classifier (models:/NAME@ALIAS, "
             "models:/NAME/VERSION, runs:/RUN_ID/model, a folder)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--imagenet", is_flag=True,
              help="instead: the top ImageNet classes by the full network (--arch) with its ImageNet head")
@click.option("--weights", default="imagenet", show_default=True,
              help="with --imagenet: 'imagenet', 'random' or a state_dict file")
@click.option("--arch", default="vgg16", show_default=True, help="with --imagenet: the backbone (any registered architecture)")
@option("image_size", default="224", show_default=True, help="with --imagenet: input side in pixels")
@click.option("--top", default="5", show_default=True, help="with --imagenet: classes per image")
@click.pass_context
@clean_exit
def predict(ctx: click.Context, images: tuple[str, ...], model_uri: str, as_json: bool, imagenet: bool,
            weights: str, arch: str, image_size: str, top: str) -> None:
    """Classify IMAGE files with a registered model (by default the champion), as served over REST.

    Prints file, label, class index and the label's score (a probability for an mlp head, a
    decision value for an svm), or with --json every class's score.
    """
    given = {name for name in ("model_uri", "weights", "arch", "image_size", "top")
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    if imagenet and "model_uri" in given:
        raise UserError("--model-uri and --imagenet exclude each other: --imagenet uses the full network, not a model")
    if not imagenet and given - {"model_uri"}:
        options = ", ".join(f"--{name}" for name in sorted(given - {"model_uri"}))
        raise UserError(f"{options}: only with --imagenet")
    paths = _image_files(images)
    if imagenet:
        from ..compute.imagenet import top_classes

        found = top_classes(paths, weights=weights, arch=arch, image_size=image_size, top=top)
        if as_json:
            click.echo(json.dumps([{"file": str(p), "top": [{"class_index": i, "name": n, "probability": pr}
                                                            for i, n, pr in classes]}
                                   for p, classes in zip(paths, found)], indent=1))
            return
        rows = [[str(p), str(rank), str(i), n, f"{pr:.4f}"]
                for p, classes in zip(paths, found) for rank, (i, n, pr) in enumerate(classes, 1)]
        click.echo(_table(["file", "rank", "class_index", "name", "probability"], rows, right={1, 2, 4}))
        return
    rows = _classify(paths, model_uri)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(_table(["file", "label", "class_index", "score"],
                      [[r["file"], r["label"], str(r["class_index"]), f"{r['score']:.4f}"] for r in rows],
                      right={2, 3}))


@main.command("register")
@click.option("--study", "study_name", required=True, metavar="NAME", help="the Optuna study (its name as run)")
@click.option("--trial", "trial_number", required=True, metavar="N", help="the trial's number (#N in its run's name)")
@option("storage", default=None,
        help="Optuna storage URL [default: OPTUNA_STORAGE, else sqlite optuna.db beside the MLflow store]")
@click.option("--name", default="", metavar="NAME", help="registered model name [default: the study file's register:]")
@clean_exit
def register(study_name: str, trial_number: str, storage: str | None, name: str) -> None:
    """Register trial N of a finished study as a new version (a multi-objective study's other
    Pareto-optimal trials: their heads are kept). Its test accuracy is computed once, for it; its
    model record carries its own configuration and metrics."""
    from ..core.config import number
    from ..runs.register_trial import register_trial

    _use_project_store()
    trial = number("--trial", int, 0)(trial_number)
    from ..models.registry import challenger_text

    model, version, metrics = register_trial(study_name, trial, storage or None, name or None)
    click.echo(f"registered {model} version {version} {challenger_text(model, version)} from trial #{trial} of "
               f"study {study_name}: val/acc={metrics['val/acc']:.4f} test/acc={metrics['test/acc']:.4f}")
