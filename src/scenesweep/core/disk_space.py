"""A tracking store on a full disk: refused before a run starts, and survived when it fills up
while one runs.

Before: ``check_store_space`` refuses a SQLite store folder with less than ``MIN_STORE_FREE_MB``
free (MLflow's database, the Optuna database beside it, and every artifact are written there),
with one line naming the folder and what it needs, before any run exists.

While: the disk can still fill up (another process, a large artifact). Ending the runs then
needs a few writes of its own, which a full disk would refuse too, leaving them RUNNING. So
each store folder keeps a small reserve file (``RESERVE_NAME``, ``RESERVE_MB``), made when space
allows; on a disk-full error the reserve is deleted first (``release_reserve``), and the runs are
ended FAILED and the trial told in the space it gives back. The next start makes it again.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import UserError

MIN_STORE_FREE_MB = 64  # a sweep's rows and plots take a few MB; a registered model takes 30 to 600
RESERVE_NAME = ".scenesweep-reserve"
RESERVE_MB = 4


class StoreFullError(UserError):
    """The tracking store's disk has (or had, mid-run) too little space: one line, naming the folder."""


def free_mb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 2**20


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: ENOSPC/EDQUOT, or SQLite's
    "database or disk is full" however MLflow, SQLAlchemy or Optuna wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__ or getattr(error, "orig", None)
    return False


def full_message(folder: Path) -> str:
    """The one line for a store whose disk filled up while it ran."""
    return (f"tracking store {folder}: the disk is full ({free_mb(folder):.0f} MB free; runs need at least "
            f"{MIN_STORE_FREE_MB} MB there): the running work was ended FAILED; free some space, then run the "
            "same command again (a sweep resumes)")


def disk_full_message(error: BaseException, store: Path | None) -> str:
    """The one line for a disk that filled up while work ran: the tracking store's when its
    folder is short of space, else whichever disk the error names."""
    if store is not None and free_mb(store) < MIN_STORE_FREE_MB:
        return full_message(store)
    filename = getattr(error, "filename", None)
    where = f" ({filename})" if filename else ""
    return (f"a disk is full{where}: {error.__class__.__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}; "
            "free some space, then run the same command again (a sweep resumes)")


def check_store_space(folder: Path, what: str) -> None:
    """Refuse ``folder`` with less than ``MIN_STORE_FREE_MB`` free (its reserve counts as free);
    else make its reserve when missing.

    Raises:
        StoreFullError: naming ``what`` (e.g. ``MLFLOW_TRACKING_URI=...``), the folder, its free
            space and what a run needs.
    """
    reserve = folder / RESERVE_NAME
    held = reserve.stat().st_size / 2**20 if reserve.is_file() else 0.0
    free = free_mb(folder) + held
    if free < MIN_STORE_FREE_MB:
        raise StoreFullError(f"{what}: {folder} has {free:.0f} MB free; runs need at least {MIN_STORE_FREE_MB} MB "
                             "there (the MLflow and Optuna databases and the artifacts): free some space or point "
                             "MLFLOW_TRACKING_URI at another folder")
    if held < RESERVE_MB:
        _make_reserve(reserve)


def _make_reserve(reserve: Path) -> None:
    """The reserve, written whole under a temporary name then renamed (a full disk leaves none)."""
    partial = reserve.with_name(f"{reserve.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as out:
            out.write(b"\0" * (RESERVE_MB * 2**20))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, reserve)
    except OSError:
        partial.unlink(missing_ok=True)


def release_reserve(folder: Path | None) -> bool:
    """Delete ``folder``'s reserve (the space to end runs on a full disk); whether there was one."""
    if folder is None:
        return False
    try:
        (folder / RESERVE_NAME).unlink()
        return True
    except OSError:
        return False
