"""``scenesweep services start|status|stop``: PostgreSQL and an MLflow server for several machines.

``start`` prints two ``export`` lines on stdout, and everything else on stderr, so that
``eval "$(scenesweep services start)"`` sets up the shell it runs in; other machines ``eval`` the
same lines (``scenesweep services start`` again prints them: it exits 0 when the services run
already). See ``scenesweep.services.shared_services`` for what starts where, and docs/services.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..services import shared_services as services
from .group import main, clean_exit

DIR_OPTION = click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
                          help="the services folder (database, artifacts, logs, password file) "
                               "[default: <repo>/services]")
# `services status` exits with this when a service does not run or does not answer.
NOT_RUNNING_STATUS = 3


@main.group("services")
def services_group() -> None:
    """PostgreSQL and an MLflow tracking server shared by the workers of one study on several machines."""


@services_group.command("start")
@DIR_OPTION
@click.option("--host", default=None, metavar="ADDRESS",
              help="address both servers bind to: 0.0.0.0 or this machine's address to serve other machines "
                   "[default: 127.0.0.1]")
@click.option("--pg-port", type=int, default=None, help="PostgreSQL's port [default: the last one, else 5432 if free]")
@click.option("--mlflow-port", type=int, default=None,
              help="the MLflow server's port [default: the last one, else 5000 if free]")
@clean_exit
def start(directory: Path | None, host: str | None, pg_port: int | None, mlflow_port: int | None) -> None:
    """Start PostgreSQL (databases mlflow and optuna) and an MLflow server on it, artifacts proxied.

    Prints, for eval: export MLFLOW_TRACKING_URI=http://... and export OPTUNA_STORAGE=postgresql://...
    (the storage URL holds the database password: workers need it). Exits 0 when the services run already.
    """
    directory = directory or services.default_dir()

    def announce() -> None:
        click.echo(f"starting PostgreSQL and the MLflow server in {directory} (up to a minute) ...", err=True)

    running, already = services.start(directory, host=host, pg_port=pg_port, mlflow_port=mlflow_port,
                                      on_start=announce)
    if already:
        click.echo(f"the services of {directory} already run: MLflow {running.tracking_uri}, "
                   f"PostgreSQL {running.address}:{running.pg_port}", err=True)
    else:
        click.echo(f"ready: MLflow {running.tracking_uri} (artifacts proxied to {directory}/artifacts), "
                   f"PostgreSQL {running.address}:{running.pg_port}; logs in {directory}/logs; "
                   f"stop with: scenesweep services stop --dir {directory}", err=True)
    click.echo(running.exports())


@services_group.command("status")
@DIR_OPTION
@clean_exit
def status(directory: Path | None) -> None:
    """Each service's pid, address and whether it answers; exit 0 when both answer, 3 otherwise."""
    directory = directory or services.default_dir()
    report = services.status(directory)
    for service in report:
        state = f"running (pid {service.pid})" if service.running else "not running"
        answer = ("answers" if service.answers else "does not answer") if service.running else ""
        click.echo(f"{service.name:<11} {state:<22} {service.address:<28} {answer}".rstrip())
    if not all(service.running and service.answers for service in report):
        sys.exit(NOT_RUNNING_STATUS)


@services_group.command("stop")
@DIR_OPTION
@clean_exit
def stop(directory: Path | None) -> None:
    """Stop the MLflow server (its whole process group) and PostgreSQL; nothing to stop is fine."""
    directory = directory or services.default_dir()
    stopped = services.stop(directory)
    click.echo(f"stopped {' and '.join(stopped)} in {directory}" if stopped else f"nothing runs in {directory}",
               err=True)
