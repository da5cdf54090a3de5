"""``scenesweep ui`` and ``scenesweep dashboard``: browse the project's stores in a browser.

``ui`` serves the MLflow UI on the tracking store (one experiment per study family, a parent
run per study with its trials nested); ``dashboard`` serves optuna-dashboard on the
Optuna storage (history, importances, intermediate values per trial). Both listen on 127.0.0.1
only, refuse a port that is taken or a store that does not exist (``error: ...``, exit 2), and
stop their whole server process group on Ctrl-C.
"""
from __future__ import annotations

import os
import urllib.parse

import click

from ..core.errors import UserError
from ..core.store_urls import sqlite_path
from ..services import servers
from .group import main, clean_exit

# MLflow 3.17 opens experiments in its GenAI view (traces); runs, metrics and charts are under
# "Model training". The UI reads this query parameter (and remembers the toggle once clicked).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # = tracking.provenance.MODEL_TRAINING_VIEW


def tracking_store_uri() -> str:
    """The tracking URI ``setup_tracking`` would use, without creating the store."""
    from ..tracking.mlflow_store import tracking_uri

    return tracking_uri()


def require_tracking_store(uri: str) -> None:
    """Raises UserError when the tracking store is missing or is not one ``mlflow ui`` can serve."""
    if uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"MLFLOW_TRACKING_URI={uri} is a tracking server already: open it in a browser")
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UserError(f"no MLflow tracking store at {database}: run something first "
                        "(make demo, or scenesweep sweep sweeps/svm_c.yaml), or set MLFLOW_TRACKING_URI")
    folder = urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri if "://" not in uri else None
    if folder is not None and not os.path.isdir(folder):
        raise UserError(f"no MLflow tracking store at {folder}: run something first or set MLFLOW_TRACKING_URI")


def experiment_links(base_url: str, limit: int = 12) -> list[tuple[str, str]]:
    """(name, address in the Model training view) of the experiments that hold runs, by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    links = [(experiment.name, f"{base_url}/#/experiments/{experiment.experiment_id}?{MODEL_TRAINING_VIEW}")
             for experiment in client.search_experiments(max_results=100)
             if client.search_runs([experiment.experiment_id], max_results=1)]
    return sorted(links)[:limit]


@main.command("ui")
@click.option("--port", default=5000, show_default=True, type=int, help="port on 127.0.0.1")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 16),
              help="uvicorn worker processes of the MLflow server (1 starts quickest)")
@clean_exit
def ui(port: int, workers: int) -> None:
    """Serve the MLflow UI on the project's tracking store, on 127.0.0.1, until Ctrl-C.

    One experiment per study family (svm, fc_width, pooling; single runs under their entry
    point's name); each study is one parent run with its trials nested under it.
    """
    uri = tracking_store_uri()
    require_tracking_store(uri)
    servers.require_free_port(port, "MLflow UI")
    from ..tracking.mlflow_store import artifact_root, setup_tracking

    uri = setup_tracking()  # also refuses a store whose schema this MLflow cannot read
    server = servers.mlflow_ui(uri, port, workers=workers, artifact_root=artifact_root(uri))
    links = experiment_links(server.url)
    database = sqlite_path(uri)
    log = servers.log_path(server, database.parent if database else None)
    click.echo(f"starting the MLflow UI on {uri}\n  at {server.url} (server log: {log}) ...")

    def announce() -> None:
        click.echo(f"MLflow UI ready: {server.url}")
        for name, url in links:
            click.echo(f"  {name:<12} {url}")
        click.echo('MLflow 3.17 opens in its GenAI view: click "Model training" (top left) once to see '
                   "runs, metrics and charts.\nCtrl-C stops it.")

    servers.serve_until_interrupted(server, log=log, on_ready=announce)
    click.echo("stopped the MLflow UI")


@main.command("dashboard")
@click.option("--port", default=8080, show_default=True, type=int, help="port on 127.0.0.1")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage URL [default: OPTUNA_STORAGE, else sqlite optuna.db beside the MLflow store, "
                   "as sweep uses]")
@clean_exit
def dashboard(port: int, storage: str | None) -> None:
    """Serve optuna-dashboard on the project's Optuna storage, on 127.0.0.1, until Ctrl-C.

    Per study: optimisation history, hyperparameter importances, parallel coordinates,
    intermediate values (per-epoch val/acc of pruned studies), and each trial's parameters with
    its MLflow run id (user attribute mlflow_run_id).
    """
    from ..search.optuna_storage import resolve_storage

    storage_url = resolve_storage(storage)
    database = sqlite_path(storage_url)
    if database is not None and not database.is_file():
        raise UserError(f"no Optuna storage at {database}: run a study first "
                        "(make demo, or scenesweep sweep sweeps/svm_c.yaml), or pass --storage URL")
    servers.require_free_port(port, "optuna-dashboard")
    server = servers.optuna_dashboard(storage_url, port)
    log = servers.log_path(server, database.parent if database else None)
    click.echo(f"starting optuna-dashboard on {storage_url}\n  at {server.url} (server log: {log}) ...")

    def announce() -> None:
        click.echo(f"optuna-dashboard ready: {server.url}/dashboard\nCtrl-C stops it.")

    servers.serve_until_interrupted(server, log=log, on_ready=announce)
    click.echo("stopped optuna-dashboard")
