"""The CPU this process runs on, as the kernel describes it: what decides how fast torch runs here.

Two machines of one cloud kind can both call themselves "Intel(R) Xeon(R) Processor" while one
runs bf16 convolutions 7x faster than fp32 (AMX exposed) and the other 0.69x (AVX-512 BF16
without AMX): the brand string alone explains no timing. Vendor, family/model/stepping and the
instruction sets below do, so runs, benchmarks and the precision probe all read them from here.

No torch here (the core layer stays free of it): torch's own view of the CPU
(``torch.backends.cpu.get_cpu_capability()``) is added by ``compute.precision``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import platform
from pathlib import Path

# The instruction sets that decide the speed of convolutions and matmuls, fastest first: AMX tiles
# (bf16/int8 matrix units), AVX-512 BF16 and FP16, VNNI (int8 dot products), then AVX2/FMA.
SPEED_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f",
               "avx_vnni", "avx2", "fma")
# Brand strings that name no model: the family/model/stepping must say which CPU it was.
GENERIC_BRANDS = ("Intel(R) Xeon(R) Processor", "Common KVM processor", "QEMU Virtual CPU", "")


@dataclasses.dataclass(frozen=True)
class CPU:
    """What /proc/cpuinfo says of the first processor (platform's guesses elsewhere).

    Attributes:
        vendor: e.g. "GenuineIntel", "AuthenticAMD".
        family, model, stepping: as the kernel prints them ("" when unknown).
        brand: the model name string.
        flags: the ``SPEED_FLAGS`` present, in that order.
        logical_cores: ``os.cpu_count()``.
    """

    vendor: str
    family: str
    model: str
    stepping: str
    brand: str
    flags: tuple[str, ...]
    logical_cores: int

    @property
    def name(self) -> str:
        """The brand, with family/model/stepping when the brand names no model.

        'Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207 stepping 2)'.
        """
        ids = " ".join(f"{k} {v}" for k, v in (("family", self.family), ("model", self.model),
                                               ("stepping", self.stepping)) if v)
        if self.brand.strip() in GENERIC_BRANDS and ids:
            return f"{self.brand or 'CPU'} ({self.vendor} {ids})".strip()
        return self.brand or self.vendor or platform.machine()

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags

    def flags_text(self) -> str:
        """'amx_bf16 amx_tile avx512_bf16 avx512_vnni avx2' or 'none of ...'."""
        return " ".join(self.flags) if self.flags else "none of " + ", ".join(SPEED_FLAGS)

    def as_dict(self) -> dict[str, str]:
        return {"cpu": self.name, "cpu_vendor": self.vendor, "cpu_family": self.family, "cpu_model": self.model,
                "cpu_stepping": self.stepping, "cpu_brand": self.brand, "cpu_flags": self.flags_text(),
                "cpu_amx": str(self.has_amx).lower()}


def parse_cpuinfo(text: str) -> CPU:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: the others repeat it
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    present = set(fields.get("flags", "").split())
    return CPU(vendor=fields.get("vendor_id", ""), family=fields.get("cpu family", ""), model=fields.get("model", ""),
               stepping=fields.get("stepping", ""), brand=fields.get("model name", ""),
               flags=tuple(f for f in SPEED_FLAGS if f in present), logical_cores=os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def this_cpu() -> CPU:
    """This machine's CPU (read once per process)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return CPU(vendor=platform.processor() or "", family="", model="", stepping="",
                   brand=platform.processor() or platform.machine(), flags=(), logical_cores=os.cpu_count() or 1)


def version(package: str) -> str:
    """The installed version of ``package``, or 'not installed'."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hardware_summary(info: dict[str, str]) -> str:
    """One line from ``compute.hardware.machine_facts()`` (or from a run's ``hardware.*`` tags with the prefix dropped):
    'Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207 stepping 2), flags avx512_bf16
    avx512_vnni avx2, torch AVX512, 2 cores, 2 threads, device cpu'."""
    parts = []
    if info.get("gpu"):
        parts.append(f"{info['gpu']} ({info.get('gpu_memory_gib', '?')} GiB, CUDA {info.get('cuda', '?')}, "
                     f"driver {info.get('gpu_driver', '?')})")
    parts.append(info.get("cpu", "unknown CPU"))
    if "cpu_flags" in info:
        parts.append(f"flags {info['cpu_flags']}")
    if "cpu_capability" in info:
        parts.append(f"torch {info.get('torch', '')} {info['cpu_capability']}".replace("  ", " "))
    parts.append(f"{info.get('cpu_cores_logical', '?')} cores, {info.get('torch_threads', '?')} threads, "
                 f"{info.get('memory_gib', '?')} GiB")
    parts.append(f"device {info.get('device', '?')}")
    return ", ".join(parts)
