"""What a run ran on and with: the command line, the hardware (and, on CUDA, a trial's peak GPU
memory and utilisation), the library versions, the requirements of logged models, the source
tags of runs made with ``MlflowClient``, and where a run is seen in the MLflow UI."""
from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

from mlflow.tracking.context.registry import resolve_tags

from ..core.machine import version
from ..core.store_urls import redact

# `scenesweep ui` (and `mlflow ui`) serve a SQLite store here by default.
LOCAL_UI = "http://127.0.0.1:5000"  # `scenesweep ui`'s default address; SCENESWEEP_UI_URL names another
GPU_SAMPLE_S = 1.0  # utilisation is sampled this often while a trial runs on CUDA

PIP_PACKAGES = ("torch", "torchvision", "scikit-learn", "numpy", "pillow", "pandas", "mlflow")


def command_line() -> str:
    """The command as the user typed it ('scenesweep ...' for `python -m scenesweep`)."""
    program = Path(sys.argv[0]).name
    return " ".join(shlex.quote(a) for a in ["scenesweep" if program == "__main__.py" else program, *sys.argv[1:]])


def pip_requirements() -> list[str]:
    """Explicit requirements of logged models (inference would pin torch for a sklearn head)."""
    return [f"{p}=={version(p)}" for p in PIP_PACKAGES if version(p) != "not installed"]


def source_tags() -> dict[str, str]:
    """The tags a fluent ``mlflow.start_run`` adds (user, source, git commit): for runs made
    with ``MlflowClient.create_run``, which adds none, so the UI would show "Created by -"."""
    return dict(resolve_tags())


@contextlib.contextmanager
def gpu_usage(device: str, sample_s: float = GPU_SAMPLE_S) -> Iterator[dict[str, float]]:
    """Peak GPU memory and utilisation while the block runs; an empty dict off CUDA.

    On a CUDA ``device`` the peak-memory counters are reset first (so the figures are this
    block's: a trial's), and utilisation is sampled every ``sample_s`` seconds (it needs
    nvidia-ml-py: ``pip install scenesweep[gpu]``; without it, memory only). Filled when the
    block ends, raised or not: ``gpu/peak_memory_allocated_mib``, ``gpu/peak_memory_reserved_mib``,
    ``gpu/utilization_mean_pct``, ``gpu/utilization_max_pct``. Threads sharing one GPU
    (``n_jobs > 1``) see the whole device's figures.
    """
    usage: dict[str, float] = {}
    import torch  # here, not at the top (see hardware)

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        yield usage
        return
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    torch.cuda.reset_peak_memory_stats(index)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            try:
                samples.append(float(torch.cuda.utilization(index)))
            except Exception:  # no nvidia-ml-py (ModuleNotFoundError), or NVML refuses: memory only
                return
            if stop.wait(sample_s):
                return

    sampler = threading.Thread(target=sample, name="gpu-usage", daemon=True)
    sampler.start()
    try:
        yield usage
    finally:
        stop.set()
        sampler.join(timeout=5)
        usage["gpu/peak_memory_allocated_mib"] = torch.cuda.max_memory_allocated(index) / 2**20
        usage["gpu/peak_memory_reserved_mib"] = torch.cuda.max_memory_reserved(index) / 2**20
        if samples:
            usage["gpu/utilization_mean_pct"] = statistics.fmean(samples)
            usage["gpu/utilization_max_pct"] = max(samples)


def ui_base(tracking_uri: str) -> str | None:
    """The MLflow UI's address for a tracking server's URI (http/https), else None."""
    if tracking_uri.startswith(("http://", "https://")):
        return redact(tracking_uri).rstrip("/")
    return None


def local_ui() -> str:
    """Where the MLflow UI of a SQLite store is browsed: ``SCENESWEEP_UI_URL`` (e.g. the
    ``--port`` given to ``scenesweep ui``, or a machine's name), else ``LOCAL_UI``."""
    return (os.environ.get("SCENESWEEP_UI_URL", "").strip() or LOCAL_UI).rstrip("/")


# MLflow 3's UI opens a run in its GenAI view unless the URL asks for the training one.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_ui_path(experiment_id: str, run_id: str) -> str:
    """A run's page in MLflow's model-training view (params, metrics, charts)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def model_version_ui_path(name: str, version: str | int) -> str:
    return f"#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


def ui_link(title: str, path: str, tracking_uri: str) -> str:
    """A Markdown link to ``path`` (e.g. ``#/experiments/1/runs/<id>``) in the MLflow UI: on the
    tracking server of an http(s) URI, else at ``scenesweep ui``'s address (see ``ui_hint``)."""
    return f"[{title}]({ui_base(tracking_uri) or local_ui()}/{path})"


def ui_hint(tracking_uri: str) -> str:
    """For a store that no UI serves by itself (SQLite): which command serves the links' address."""
    if ui_base(tracking_uri) is not None:
        return ""
    uri = redact(tracking_uri)
    return (f"The links open in the MLflow UI of `{uri}` at {local_ui()}: `scenesweep ui`, or "
            f"`mlflow ui --backend-store-uri {uri}`, serves it there (another address: set "
            "SCENESWEEP_UI_URL before the sweep).")
