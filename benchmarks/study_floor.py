"""The floor of each stage of the study: what it ran, measured right after it (same machine
state) with ``benchmarks/floor.py``: the summed conv-layer ceiling of each extraction setting
and the bare head step of each head (``StageFloor``).

Part of ``benchmarks/study.py``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/floor.py, _common.py
from _common import load_numbers  # noqa: E402
from study_reading import WorkRun  # noqa: E402


@dataclass
class StageFloor:
    """The floor of one stage's settings, measured right after the stage (same machine state).

    Attributes:
        ceilings: extraction key (arch, image_size, batch_size, precision) -> floor.ConvCeiling.
        heads: head key (widths, batch_size) -> floor.HeadStep.
        load: load average when it was measured.
    """

    ceilings: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    load: list[float] | None = None

    def extract_s(self, w: WorkRun) -> float:
        """Its images at the summed conv-layer ceiling; a shared pass of b pooling types: the
        layers before the first pooling (block 1) once, the others b times."""
        if not w.extract_key:
            return 0.0
        ceiling = self.ceilings[w.extract_key]
        if w.branches <= 1:
            return w.images_extracted * ceiling.seconds_per_image
        trunk = sum(layer.time_s(ceiling.statistic) for layer in ceiling.layers if layer.name.startswith("conv1_"))
        per_batch = trunk + w.branches * (ceiling.seconds_per_batch - trunk)
        return w.images_extracted * per_batch / ceiling.batch_size

    def head_s(self, w: WorkRun, steps: int) -> float:
        return steps * self.heads[w.head_key].floor_s if w.head_key else 0.0

    def as_dict(self) -> dict:
        return {"load_average": self.load,
                "conv_ceilings": [{"key": list(k), **c.as_dict()} for k, c in self.ceilings.items()],
                "head_steps": [{"key": [list(k[0]), k[1]], **h.as_dict()} for k, h in self.heads.items()]}


def measure_floor(work: list[WorkRun], device, repeats: int, steps: int) -> StageFloor:
    """The summed conv-layer ceiling and the bare head step of every setting in ``work``."""
    import floor

    measured = StageFloor(load=load_numbers())
    for key in sorted({w.extract_key for w in work if w.extract_key}, key=str):
        arch, image_size, batch_size, precision = key
        # The floor is the faster precision's ceiling, whichever the run chose (or was given).
        candidates = [floor.conv_ceiling(arch, image_size, batch_size, p, device, repeats) for p in floor.PRECISIONS]
        measured.ceilings[key] = min(candidates, key=lambda c: c.seconds_per_batch)
    for key in sorted({w.head_key for w in work if w.head_key}, key=str):
        widths, batch_size = key
        measured.heads[key] = floor.head_step(widths, batch_size, device=device, steps=steps)
    return measured
