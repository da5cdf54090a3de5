"""One run lifecycle: create (``create_run``), start (or re-attach to ``mlflow run``'s run),
reopen (``reopen_run``), then end it with the status and tags that say how it ended. Every driver
(single runs, experiments, trials, a study's parent) creates, reopens and ends its runs here;
statuses are ``Status``, the kinds of failure ``Failure``.

How a run ends, and what it carries:

| how the work ended | status | tags |
|---|---|---|
| it returned | FINISHED | - |
| pruned (an exception in ``pruned``) | KILLED | ``pruned`` (why), ``failure=pruned`` |
| Ctrl-C or SIGTERM (KeyboardInterrupt, ``Interrupted``) | KILLED | ``error``, ``failure=interrupted``, ``signal`` |
| bad input (``UserError``) | FAILED | ``error`` (one line), ``failure=error`` |
| a bug (any other exception) | FAILED | ``error``, ``failure=error``, artifact ``error/traceback.txt`` |
| the store's disk full | FAILED | ``error``, ``failure=error`` (ended in the space of the store's reserve) |
| its process died (found by another) | FAILED | ``error``, ``failure=killed`` (on its host) or ``stale`` (by heartbeat) |

Runs are named by id and ended through ``MlflowClient`` (the fluent run of this thread, if it is
that run, through ``mlflow.end_run`` so that its system-metrics monitor stops), so the same code
serves a fluent run, a trial's run made by ``MlflowClient.create_run`` in a worker thread, and a
parent run another process started.
"""
from __future__ import annotations

import contextlib
import os
import signal
import traceback
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from ..core.disk_space import is_disk_full, release_reserve
from ..core.errors import UserError, describe_error
from ..core.run_states import Failure, Status
from . import mlflow_store

class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM from a scheduler, ``timeout``, systemd), raised in the main
    thread so that runs end as after Ctrl-C; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def launched_run_id() -> str | None:
    """``mlflow run``'s own run (its environment carries MLFLOW_RUN_ID), else None."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def create_run(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """A new run (not this thread's active one: a trial's in a worker thread, a study's parent)
    in RUNNING, named and tagged; returns its id."""
    return MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id


def adopt_run(run_id: str, tags: dict[str, str]) -> None:
    """A run another process made (``mlflow run``'s) taken over: ``tags`` say what it is now."""
    MlflowClient().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def reopen_run(run_id: str, name: str | None = None) -> None:
    """An ended run running again (a resumed study's parent), renamed when ``name`` is given."""
    MlflowClient().update_run(run_id, status=Status.RUNNING, name=name)


def _terminate(run_id: str, status: Status) -> None:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        MlflowClient().set_terminated(run_id, status)


def _ended_name(run, failure: str, pruned: str) -> str | None:
    """A trial's run name saying how it ended, as its log line does: '... · pruned at epoch 2'
    (the runs table shows only a red cross otherwise), '... · failed: killed'; None for a run
    that is not a trial, or whose name says it already."""
    if "mlflow.parentRunId" not in run.data.tags:
        return None
    name = run.info.run_name or ""
    ending = pruned.split(":", 1)[0] if failure == "pruned" and pruned.startswith("pruned") else \
        ("pruned" if failure == "pruned" else f"failed: {failure}")
    return None if name.endswith(f" · {ending}") else f"{name} · {ending}"


def end_run(run_id: str, status: Status | str = Status.FINISHED, error: BaseException | str | None = None,
            failure: Failure | str | None = None, only_running: bool = False, **tags: Any) -> bool:
    """End ``run_id`` with ``status``; an ``error`` (exception or text) goes into the ``error`` tag
    (cut to MLflow's 5000 characters), ``failure`` says which kind (``Failure``; anything else is
    a bug, a ValueError); a bug's traceback is logged as ``error/traceback.txt``.

    Args:
        only_running: leave a run that already ended as it is (a run a resume finds dead).

    Returns:
        Whether the run was ended here.
    """
    status, failure = Status(status), (Failure(failure) if failure is not None else None)
    client = MlflowClient()
    full = isinstance(error, BaseException) and is_disk_full(error)
    if full:  # the writes below need the space the store's reserve holds (core.disk_space)
        release_reserve(mlflow_store.store_folder())
    if only_running:
        try:
            if client.get_run(run_id).info.status != Status.RUNNING:
                return False
        except mlflow.exceptions.MlflowException:
            return False
    labels = {k: str(v) for k, v in tags.items() if v is not None}
    if error is not None:
        labels["error"] = describe_error(error) if isinstance(error, BaseException) else str(error)[:5000]
    if failure is not None:
        labels["failure"] = str(failure)
    if failure is not None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            name = _ended_name(client.get_run(run_id), failure, labels.get("pruned", ""))
            if name:
                labels["mlflow.runName"] = name
    if labels:
        client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in labels.items()])
    if isinstance(error, BaseException) and failure == Failure.ERROR and not isinstance(error, UserError) and not full:
        with contextlib.suppress(Exception):  # the traceback is a help, never why ending fails
            client.log_text(run_id, "".join(traceback.format_exception(error)), "error/traceback.txt")
    _terminate(run_id, status)
    return True


@contextlib.contextmanager
def ending(run_id: str, pruned: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """End ``run_id`` by how the block ends (see the module's table), and re-raise."""
    try:
        yield
    except pruned as error:
        end_run(run_id, Status.KILLED, failure=Failure.PRUNED, pruned=str(error) or "true")
        raise
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        end_run(run_id, Status.KILLED, f"interrupted by {signal.Signals(signum).name}", failure=Failure.INTERRUPTED,
                signal=signal.Signals(signum).name)
        raise
    except BaseException as error:
        try:
            end_run(run_id, Status.FAILED, error, failure=Failure.ERROR)
        except Exception:  # the store itself failed (a full disk past its reserve): the cause is what counts
            if not is_disk_full(error):
                raise
        raise
    end_run(run_id, Status.FINISHED, only_running=True)  # unless the block ended it (a failed study)


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, tags: dict[str, str] | None = None,
              system_metrics: bool = True) -> Iterator[mlflow.ActiveRun]:
    """A fluent run in ``experiment`` (or, under ``mlflow run``, the project's run re-attached,
    in the experiment it was launched in), ended by ``ending``.
    """
    launched = launched_run_id()
    kwargs: dict[str, Any] = {"log_system_metrics": system_metrics, "tags": dict(tags or {})}
    if launched:
        run = mlflow.start_run(run_id=launched, **kwargs)
        MlflowClient().set_tag(launched, "mlflow.runName", run_name)
        mlflow_store.warn_if_not_in_family(run, experiment)
    else:
        run = mlflow.start_run(experiment_id=mlflow_store.experiment_id(experiment), run_name=run_name, **kwargs)
    try:
        with ending(run.info.run_id):
            yield run
    finally:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
            mlflow.end_run()  # ended already unless ``ending`` itself failed
