"""What a measurement ran on, in enough detail to explain its timings.

The CPU's vendor, family/model/stepping (its brand string can be a generic "Intel(R) Xeon(R)
Processor" on machines 10x apart), the instruction sets that decide speed (AMX, AVX-512 BF16/FP16,
VNNI, AVX2), torch's CPU capability and threads; on CUDA the GPU's name, memory, driver, CUDA and
cuDNN versions. Runs tag it (``hardware.*``), the study's parent too, the report prints one line
per stage from it, and the benchmarks print it in their headers.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import psutil
import torch

from ..core.errors import ConfigError
from ..core.machine import hardware_summary, this_cpu, version

VERSIONED_PACKAGES = ("torch", "torchvision", "mlflow", "optuna", "scikit-learn", "numpy")


def cpu_capability() -> str:
    """torch's view of the CPU's vector unit ('AVX512', 'AVX2', 'DEFAULT', ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def gpu_details(device: str) -> dict[str, str]:
    """Name, memory, driver, CUDA and cuDNN of the GPU ``device`` names (empty off CUDA)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    info = {"gpu": props.name, "gpu_memory_gib": f"{props.total_memory / 2**30:.1f}",
            "gpu_capability": f"{props.major}.{props.minor}", "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version())}
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        info["gpu_driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[index]
    return info


def machine_facts(device: str = "cpu") -> dict[str, str]:
    """What a run ran on (its ``hardware.*`` tags): CPU (model, flags, torch's capability), cores, threads, memory, library
    versions, device; the GPU's details on CUDA."""
    info = {**this_cpu().as_dict(), "cpu_capability": cpu_capability(),
            "cpu_cores_logical": str(os.cpu_count()), "cpu_cores_physical": str(psutil.cpu_count(logical=False)),
            "torch_threads": str(torch.get_num_threads()),
            "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}", "os": platform.platform(),
            "python": platform.python_version(), "device": str(device)}
    for package in VERSIONED_PACKAGES:
        info[package] = version(package)
    info.update(gpu_details(str(device)))
    return info


def describe(device: str | torch.device = "cpu") -> str:
    """This machine in one line (benchmarks' headers)."""
    return hardware_summary(machine_facts(str(device)))


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available here; use device=auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512 BF16 or AMX): it can, not that it is faster
    (without AMX, bf16 convolutions ran 0.69x fp32); ``precision`` measures which is."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
