"""The feature cache: content-keyed, atomic, self-checking entries of the trunk's output and of
each feature layer (see ``compute.features`` for what is stored and when). A key is the digest
of everything that changes an entry (``conv_key_parts``, ``layer_key_parts``); an entry is
``<key>.npy`` + ``<key>.json``, both written to a temporary file and renamed, the JSON last (the
commit mark); an in-process memo keeps the last few arrays.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..core.backbone_families import family_of
from ..core.config import FC_WIDTH_PRETRAINED, RunConfig
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from . import backbone
from .atomic_files import atomic_write
from .data import Dataset

CACHE_FORMAT = 2  # 2: fc6/fc7 computed in the extraction precision


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def conv_key_parts(config: RunConfig, dataset: Dataset, precision: str) -> dict[str, Any]:
    """Everything that changes the stored trunk output (the transform's size is image_size).

    The pooling is a part only where it sits inside the trunk (VGG's max-pools): a global pooling
    comes after it, so one entry serves every pooling type (``layer_key_parts`` names it).
    """
    parts = {"format": CACHE_FORMAT, "stage": "conv", "dataset": dataset.fingerprint,
             "weights": backbone.weights_identity(config.weights, config.arch, config.seed),
             "arch": config.arch, "pooling": config.pooling, "image_size": config.image_size,
             "transform": backbone.transform_identity(config.arch), "precision": precision}
    if not family_of(config.arch).pools_in_trunk:
        del parts["pooling"]
    return parts


def layer_key_parts(config: RunConfig, conv_key: str) -> dict[str, Any]:
    family = family_of(config.arch)
    parts = {"format": CACHE_FORMAT, "stage": "layer", "conv": conv_key, "layer": config.layer}
    if not family.pools_in_trunk:
        parts["pooling"] = config.pooling
    if config.layer in family.fc_taps:
        parts["fc_width"] = config.fc_width
        if config.fc_width != FC_WIDTH_PRETRAINED:
            parts["fc_seed"] = config.seed  # new fc layers are seeded
    return parts


class FeatureCache:
    """A folder of ``<key>.npy`` + ``<key>.json`` entries, with an in-process memo on top."""

    def __init__(self, root: str | os.PathLike, memo_size: int = 4):
        self.root = Path(root)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def meta(self, key: str) -> dict | None:
        """The metadata of an entry whose array is present, or None (missing, truncated, not JSON).

        Reads the small sidecar only: for what an entry records (timings) without loading it.
        """
        array_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and array_path.is_file() else None

    def load(self, key: str) -> tuple[np.ndarray, dict] | None:
        """The stored array and its metadata, or None when missing or damaged (a folder or other
        non-file where an entry should be is removed, so that the entry can be written again)."""
        array_path, meta_path = self.paths(key)
        for path in (array_path, meta_path):
            if path.is_symlink() or (path.exists() and not path.is_file()):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if key in self._memo:
                return self._memo[key], meta
            array = np.load(array_path, allow_pickle=False)
            if (list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]
                    or hashlib.sha256(array.tobytes()).hexdigest() != meta["sha256"]):
                raise ValueError("content does not match its metadata")
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            # Truncated, corrupt or half-deleted: drop it so that it is recomputed.
            for path in (meta_path, array_path):
                path.unlink(missing_ok=True)
            return None
        self._remember(key, array)
        return array, meta

    def save(self, key: str, array: np.ndarray, meta: dict) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        array = np.ascontiguousarray(array)
        meta = {**meta, "key": key, "shape": list(array.shape), "dtype": str(array.dtype),
                "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
        array_path, meta_path = self.paths(key)
        atomic_write(array_path, lambda handle: np.save(handle, array, allow_pickle=False), array.nbytes)
        atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta, indent=1).encode()))
        self._remember(key, array)
        return meta

    def _remember(self, key: str, array: np.ndarray) -> None:
        self._memo[key] = array
        self._memo.move_to_end(key)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)


# One cache object per folder and process, so its memo serves every trial of a sweep.
_CACHES: dict[Path, FeatureCache] = {}


def feature_cache(root: str | os.PathLike) -> FeatureCache:
    path = Path(root).resolve() / "features"
    if path not in _CACHES:
        _CACHES[path] = FeatureCache(path)
    return _CACHES[path]


def forget_memos() -> None:
    """Drop every folder's in-process memo (a benchmark's "fresh" cache must not be served from
    memory)."""
    _CACHES.clear()
