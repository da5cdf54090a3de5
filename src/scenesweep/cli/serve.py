"""``scenesweep serve``: a model over REST, as ``mlflow models serve`` serves it, behind a guard.

The same app, routes and payloads as ``mlflow models serve --env-manager local`` (MLflow's
``mlflow.pyfunc.scoring_server``, in this Python), in front of it ``scenesweep.serving.guard``:
a request size limit, the Content-Type MLflow takes, a JSON depth limit, and error answers that
never repeat the request. Bad input here (a model that does not load, a port that is taken) is
one ``error: ...`` line; Ctrl-C or SIGTERM stops the server (and its workers) cleanly.
"""
from __future__ import annotations

import errno
import gc
import socket

import click

from ..core.errors import UserError, first_line
from ..services import servers
from ..serving.app import DEFAULT_PORT, DEFAULT_TIMEOUT_S, ServeSettings, serve as run_server
from ..serving.guard import DEFAULT_MAX_DEPTH, DEFAULT_MAX_REQUEST_MB, Limits
from .group import main, clean_exit
from .model_commands import DEFAULT_MODEL_URI, _use_project_store

TITLE = "model server"


def require_listenable(host: str, port: int) -> None:
    """Raises UserError unless a server could listen on host:port now (checked before the model
    is loaded, which takes seconds): 127.0.0.1 as ``scenesweep ui`` checks it, any other host by
    binding a probe socket."""
    if host == servers.LOCALHOST:
        servers.require_free_port(port, TITLE)
        return
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected a port number between 1 and 65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: not a known address ({error.strerror})") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another {TITLE}?): "
                                "stop it or pick another with --port") from None
            raise UserError(f"--host {host}: cannot listen there ({error.strerror})") from None


def load_served_model(model_uri: str, workers: int):
    """(the model's local folder, the model loaded from it), as ``mlflow models serve`` resolves
    it: once, here (an alias moved later does not change what this server serves). With several
    workers each loads its own: here it is only loaded to check it, and None is returned."""
    import mlflow

    from ..serving.app import check_model, load_model

    _use_project_store()
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
        if workers > 1:
            check_model(path)
            return path, None
        return path, load_model(path)
    except Exception as error:  # MlflowException, OSError, or the model's own load_context failing
        detail = first_line(error) or type(error).__name__
        hint = "; promote a version first: scenesweep promote" if "@champion" in model_uri else ""
        raise UserError(f"MODEL_URI {model_uri}: cannot load it ({detail}){hint}") from None


@main.command("serve")
@click.argument("model_uri", default=DEFAULT_MODEL_URI, metavar="[MODEL_URI]")
@click.option("--host", default=servers.LOCALHOST, show_default=True,
              help="address to listen on (0.0.0.0: every interface; only behind a firewall or proxy you trust)")
@click.option("--port", "-p", default=DEFAULT_PORT, show_default=True, type=int, help="port to listen on")
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(1, 64),
              envvar="MLFLOW_MODELS_WORKERS", help="uvicorn worker processes, each with its own copy of the model")
@click.option("--timeout", "-t", default=DEFAULT_TIMEOUT_S, show_default=True, type=click.IntRange(1),
              envvar="MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT",
              help="seconds a request may take before it is answered 504 (as mlflow models serve's)")
@click.option("--max-request-mb", default=float(DEFAULT_MAX_REQUEST_MB), show_default=True,
              type=click.FloatRange(0, 1024, min_open=True), help="largest request body in MiB (larger: 413)")
@click.option("--max-json-depth", default=DEFAULT_MAX_DEPTH, show_default=True, type=click.IntRange(1, 512),
              help="deepest JSON nesting of a request (deeper: 400)")
@clean_exit
def serve(model_uri: str, host: str, port: int, workers: int, timeout: int, max_request_mb: float,
          max_json_depth: int) -> None:
    """Serve MODEL_URI over REST as `mlflow models serve` does, behind a guard, until Ctrl-C.

    MODEL_URI: any MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model,
    a folder) [default: the champion]. POST /invocations takes the payloads of `mlflow models
    serve` (JSON: dataframe_split, dataframe_records, instances, inputs; or CSV); /ping, /health
    and /version answer as there. Requests over the limits are refused (413, 415, 400), and no
    error answer repeats the request (see docs/serving.md).
    """
    require_listenable(host, port)
    limits = Limits(max_request_bytes=int(max_request_mb * 2**20), max_depth=max_json_depth)
    try:
        path, model = load_served_model(model_uri, workers)
        gc.collect()  # with workers: the model checked is let go, this process only supervises
        click.echo(f"serving {model_uri} (from {path}) at http://{host}:{port}/invocations\n"
                   f"  MLflow's scoring server behind scenesweep's guard: {workers} worker(s), "
                   f"requests up to {max_request_mb:g} MiB, JSON up to {max_json_depth} deep, "
                   f"{timeout} s each. Ctrl-C stops it.")
        settings = ServeSettings(path, host, port, workers, timeout, limits)
        run_server(settings, model)
    except KeyboardInterrupt:  # uvicorn stopped gracefully, then raised the signal it caught again
        pass
    click.echo(f"stopped the {TITLE}")
