"""What a run ran on and with: the command line, the hardware, the library versions, the
requirements of logged models and the source tags of runs made with ``MlflowClient``."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
from mlflow.tracking.context.registry import resolve_tags

PIP_PACKAGES = ("torch", "torchvision", "scikit-learn", "numpy", "pillow", "pandas", "mlflow")
VERSIONED_PACKAGES = ("torch", "torchvision", "mlflow", "optuna", "scikit-learn", "numpy")


def command_line() -> str:
    """The command as the user typed it ('scenesweep ...' for `python -m scenesweep`)."""
    program = Path(sys.argv[0]).name
    return " ".join(shlex.quote(a) for a in ["scenesweep" if program == "__main__.py" else program, *sys.argv[1:]])


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu") -> dict[str, str]:
    """What a run ran on: CPU, cores, memory, library versions, device; GPU details on CUDA."""
    import torch  # here, not at the top: `scenesweep ui` and `report` read provenance without torch (5 s)

    info = {"cpu": cpu_model(), "cpu_cores_logical": str(os.cpu_count()),
            "cpu_cores_physical": str(psutil.cpu_count(logical=False)),
            "torch_threads": str(torch.get_num_threads()),
            "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}", "os": platform.platform(),
            "python": platform.python_version(), "device": device}
    for package in VERSIONED_PACKAGES:
        info[package] = version(package)
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": f"{props.total_memory / 2**30:.1f}",
                     "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())})
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            info["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    return info


def pip_requirements() -> list[str]:
    """Explicit requirements of logged models (inference would pin torch for a sklearn head)."""
    return [f"{p}=={version(p)}" for p in PIP_PACKAGES if version(p) != "not installed"]


def source_tags() -> dict[str, str]:
    """The tags a fluent ``mlflow.start_run`` adds (user, source, git commit): for runs made
    with ``MlflowClient.create_run``, which adds none, so the UI would show "Created by -"."""
    return dict(resolve_tags())
