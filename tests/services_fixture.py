"""A reusable pytest fixture: real PostgreSQL and a real MLflow server, as ``scenesweep services`` starts them.

Use it from any test file (the tests folder is on sys.path, as for conftest)::

    from services_fixture import postgres_services  # noqa: F401  (pytest finds it by name)

    def test_workers(postgres_services):
        env = {"MLFLOW_TRACKING_URI": postgres_services.tracking_uri,
               "OPTUNA_STORAGE": postgres_services.storage_url}
        ...
        postgres_services.restart_postgres()  # the database restarts mid-sweep

One instance per test module, on free ports of 127.0.0.1, in a temporary folder; everything is
stopped and removed at teardown. Needs Debian's postgresql package (``make test`` installs it).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest

from scenesweep.services import servers
from scenesweep.services import shared_services as services
from scenesweep.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class PostgresServices:
    """Running services and how to reach them.

    Attributes:
        dir: the services folder (DIR/artifacts holds the proxied artifacts, DIR/logs the logs).
        tracking_uri: the MLflow server, ``http://127.0.0.1:PORT``.
        storage_url: the Optuna storage, ``postgresql://scenesweep:PASSWORD@127.0.0.1:PORT/optuna``.
        mlflow_database_url: the MLflow server's own database, for checks straight in its tables.
        services: the underlying ``scenesweep.services.Services`` (ports, password, exports()).
    """

    dir: Path
    tracking_uri: str
    storage_url: str
    mlflow_database_url: str
    services: services.Services

    def restart_postgres(self) -> None:
        """Stop PostgreSQL (fast: open sessions are cut) and start it again on the same port;
        the MLflow server stays up and reconnects (its pool pre-pings)."""
        services.restart_postgres(self.dir)


def _two_free_ports() -> tuple[int, int]:
    first = servers.free_port()
    second = servers.free_port()
    while second == first:
        second = servers.free_port()
    return first, second


@pytest.fixture(scope="module")
def postgres_services():
    """PostgreSQL (databases mlflow and optuna) and an MLflow server on it, artifacts proxied."""
    base = Path(tempfile.mkdtemp(prefix="scenesweep-services-"))
    # Under root PostgreSQL runs as the postgres user, which must pass through this folder
    # (mkdtemp makes it 0700; pytest's tmp_path lives under a 0700 folder too, hence not used).
    base.chmod(0o711)
    directory = base / "services"
    pg_port, mlflow_port = _two_free_ports()
    try:
        running, _ = services.start(directory, host=servers.LOCALHOST, pg_port=pg_port, mlflow_port=mlflow_port)
    except UserError as error:
        services.stop(directory)
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start the services: {error}", pytrace=False)
    try:
        yield PostgresServices(directory, running.tracking_uri, running.storage_url, running.mlflow_database_url,
                               running)
    finally:
        services.stop(directory)
        shutil.rmtree(base, ignore_errors=True)
