"""Serving a logged model over REST: MLflow's own scoring app behind a guard (``scenesweep serve``).

``guard``: the ASGI middleware (size, Content-Type and JSON depth limits; error answers that never
repeat the request), standard library only. ``app``: MLflow's scoring app in the guard, served by
uvicorn with one or more workers.

This package takes the place of the old module ``scenesweep/serving.py`` (a package wins over a
module of the same name): models logged before ``scenesweep.models`` existed name their pickled
classes ``scenesweep.serving.HeadModel`` and ``ImageClassifier``, so those names still resolve
here. Lazily (PEP 562), so that importing the guard imports neither torch nor MLflow.
"""
from __future__ import annotations

_MOVED = {"HeadModel", "ImageClassifier", "InputError"}  # now in scenesweep.models.pyfunc


def __getattr__(name: str):
    if name in _MOVED:
        from ..models import pyfunc

        return getattr(pyfunc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
