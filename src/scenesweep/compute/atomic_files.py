"""Files written whole or not at all: a temporary file beside the target, synced, then renamed.

A reader sees the old file or the whole new one, never half of it. A writer killed mid-write leaves
its temporary file (``.<name>.<host>.<pid>.<random>.tmp``): the next write into the folder removes
those of this host whose process is gone (and any older than a day). A full disk is one
``CacheFullError`` naming the folder and the space needed, not an ``OSError`` traceback.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil

from ..core import faults
from ..core.errors import UserError

TMP_SUFFIX = ".tmp"
ORPHAN_AGE_S = 24 * 3600  # a temporary file of another host's process is taken as dead after this


def sweep_orphans(folder: Path) -> int:
    """Remove the temporary files that killed writers left in ``folder`` (``.<name>.<host>.<pid>.*.tmp``):
    those of this host whose process is gone, and any older than ``ORPHAN_AGE_S``. Returns how many."""
    host, removed = socket.gethostname().replace(".", "-"), 0
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    except OSError:
        return 0
    for candidate in candidates:
        parts = candidate.name.split(".")
        try:
            stale = time.time() - candidate.stat().st_mtime > ORPHAN_AGE_S
            dead_here = len(parts) >= 5 and parts[-4] == host and parts[-3].isdigit() and not psutil.pid_exists(int(parts[-3]))
        except OSError:
            continue
        if stale or dead_here:
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed += 1
    return removed


class CacheFullError(UserError):
    """The cache folder's disk is full: the message names the folder and the space needed."""


def atomic_write(path: Path, write, size_hint: int = 0) -> None:
    """``write(handle)`` into a temporary file beside ``path``, synced, then renamed to ``path``:
    a reader sees the old file or the whole new one, never half of it. Temporary files of killed
    writers are swept first; a full disk is one ``CacheFullError`` naming the folder and the space
    needed (``size_hint`` bytes), the temporary file removed."""
    sweep_orphans(path.parent)
    host = socket.gethostname().replace(".", "-")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{host}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        faults.moment("cache-write")
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # numpy reports a short write as "N requested and M written", without an errno.
        free = shutil.disk_usage(path.parent).free if isinstance(error, OSError) else None
        if isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                           or (error.errno is None and free is not None and free < max(size_hint, 1))):
            raise CacheFullError(f"cache_dir: {path.parent} is full: writing {path.name} needs "
                                 f"{max(size_hint, 1) / 2**20:.1f} MB, {free / 2**20:.1f} MB free; free some space "
                                 "or pass --cache_dir on a larger disk") from None
        raise
