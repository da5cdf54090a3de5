"""The device the floor measures on (``benchmarks/floor.py``): resolved as scenesweep resolves it,
and synchronised around each timed call so that wall-clock time covers the kernels."""
from __future__ import annotations

import _common  # noqa: F401  (puts src/ on the path when needed)

import torch

from scenesweep.compute import hardware  # device, as the extractor resolves it


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock time covers the kernels (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu (as scenesweep's own ``device=auto``)."""
    return name if isinstance(name, torch.device) else hardware.resolve_device(name)
