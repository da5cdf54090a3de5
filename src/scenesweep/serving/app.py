"""MLflow's own scoring app (what ``mlflow models serve`` runs) behind the guard, served by uvicorn.

``mlflow models serve --env-manager local`` resolves the model URI to a local folder once, puts
the folder in an environment variable and starts ``uvicorn mlflow.pyfunc.scoring_server.app:app``
with ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` set (its ``--timeout``; uvicorn gets no timeout
option). This does the same in this Python, with the guard around the app: one worker serves the
model loaded here; several need an import string, so each worker calls ``create_app``, which
reads the folder and the limits from the environment the supervisor passes on.
Imports neither click nor the CLI; MLflow and uvicorn only inside the functions.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from .guard import Guard, Limits

MODEL_PATH_ENV = "SCENESWEEP_SERVE_MODEL_PATH"
MAX_REQUEST_BYTES_ENV = "SCENESWEEP_SERVE_MAX_REQUEST_BYTES"
MAX_DEPTH_ENV = "SCENESWEEP_SERVE_MAX_JSON_DEPTH"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's: read when its app is built
FACTORY = "scenesweep.serving.app:create_app"
DEFAULT_PORT = 5001
DEFAULT_TIMEOUT_S = 60  # MLflow's default
# On Ctrl-C or SIGTERM uvicorn stops accepting, then waits this long for requests in flight.
SHUTDOWN_GRACE_S = 10


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How to serve: the model's local folder, where to listen, workers, timeout and limits."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    timeout_s: int = DEFAULT_TIMEOUT_S
    limits: Limits = Limits()


def load_model(model_path: str) -> Any:
    """The pyfunc model as MLflow's scoring server loads it (SERVING_MODEL_CONFIG honoured)."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.load_model_with_mlflow_config(model_path)


def check_model(model_path: str) -> None:
    """Load the model once and let it go, to fail here rather than in every worker, with
    ``sys.path`` left as it was: loading puts the model's logged code folder (its own copy of
    scenesweep) first on ``sys.path``, and the workers, started by spawn, inherit ``sys.path``;
    they would import ``scenesweep`` from that copy, which may predate ``scenesweep.serving``."""
    saved = list(sys.path)
    try:
        load_model(model_path)
    finally:
        sys.path[:] = saved


def safe_words(model: Any) -> tuple[str, ...]:
    """Words an error message may repeat from a request: MLflow's input keys, the model's inputs."""
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    names = [str(name) for name in schema.input_names()] if schema is not None and schema.has_input_names() else []
    return (*sorted(scoring_server.SUPPORTED_FORMATS), "columns", "index", "data",
            scoring_server.SERVING_PARAMS_KEY, *names)


def build_app(model: Any, limits: Limits) -> Guard:
    """MLflow's scoring app for ``model`` (routes /invocations, /ping, /health, /version) in the guard.

    MLflow reads its request timeout from the environment here: call ``export`` first.
    """
    from mlflow.pyfunc import scoring_server

    return Guard(scoring_server.init(model), limits, safe_words(model))


def export(settings: ServeSettings) -> None:
    """Put what a worker needs in this process's environment (workers inherit it)."""
    os.environ[MODEL_PATH_ENV] = settings.model_path
    os.environ[MAX_REQUEST_BYTES_ENV] = str(settings.limits.max_request_bytes)
    os.environ[MAX_DEPTH_ENV] = str(settings.limits.max_depth)
    os.environ[TIMEOUT_ENV] = str(settings.timeout_s)


def create_app() -> Guard:
    """The app factory each uvicorn worker calls (``--workers`` > 1): settings from ``export``."""
    limits = Limits(int(os.environ[MAX_REQUEST_BYTES_ENV]), int(os.environ[MAX_DEPTH_ENV]))
    return build_app(load_model(os.environ[MODEL_PATH_ENV]), limits)


def serve(settings: ServeSettings, model: Any = None) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's graceful shutdown, then it returns).

    Args:
        settings: what and how to serve.
        model: the model already loaded from ``settings.model_path``, for one worker (else loaded
            here); with several workers each loads its own and this process only supervises.
    """
    import uvicorn

    export(settings)
    common = {"host": settings.host, "port": settings.port, "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
              "log_level": "info"}
    if settings.workers == 1:
        app = build_app(model if model is not None else load_model(settings.model_path), settings.limits)
        uvicorn.Server(uvicorn.Config(app, **common)).run()
    else:
        uvicorn.run(FACTORY, factory=True, workers=settings.workers, **common)
