"""4 KiB pages against huge pages, for what a run allocates once and for what a head step allocates again and again.

Each case runs in a fresh process (PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once), rounds interleaved:

* building VGG16 with random weights (``backbone.build_backbone``), at fc width 4096 and 16384
  (the fc-width study's widest: fc6/fc7 are 680 M new parameters): seconds;
* the study's pool5 head (25088-1024-1024-15, dropout 0.5, Adam fused, batch 8) on random
  features, its first layer a plain ``nn.Linear`` (autograd allocates its 100 MB weight
  gradient afresh every step) or ``KeptGradLinear`` (``compute/mlp_layers.py``: one buffer):
  the median step in ms and the minor page faults per step.

    .venv/bin/python benchmarks/huge_pages.py [--rounds 2] [--steps 100]

It answers why ``compute/numerics.py`` leaves huge pages off: on a virtual machine whose free
memory is reported to the host (``dmesg``: "Free page reporting enabled"), a fresh huge page costs
the host's fault as well; the head's repeated gradient is what huge pages were for, and the kept
buffer removes it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py
from _common import load_average, machine_line, table  # noqa: E402

PAGES = {"4 KiB": "0", "huge": "1"}
WIDTHS = (4096, 16384)


def build_seconds(fc_width: int) -> float:
    from scenesweep.compute import backbone

    began = time.perf_counter()
    model = backbone.build_backbone("vgg16", "random", fc_width=fc_width, image_size=32)
    seconds = time.perf_counter() - began
    del model
    return seconds


def head_step(first_layer: str, steps: int) -> dict[str, float]:
    """Median step (s) and minor faults per step of the pool5 head with that first layer."""
    import torch
    from torch import nn

    from scenesweep.compute.mlp_layers import build_mlp

    torch.manual_seed(0)
    model = build_mlp(25088, (1024, 1024), 0.5, 15)
    if first_layer == "nn.Linear":  # the same weights in autograd's own layer
        plain = nn.Linear(25088, 1024)
        plain.load_state_dict(model[0].state_dict())
        model[0] = plain
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    X, y = torch.randn(512, 25088), torch.randint(0, 15, (512,))  # (N, 25088) random pool5-wide features
    times, faults = [], []
    for step in range(steps + 10):
        index = torch.randint(0, 512, (8,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        began = time.perf_counter()
        loss = nn.functional.cross_entropy(model(X[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 10:  # the first steps allocate Adam's state
            times.append(time.perf_counter() - began)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"median_s": statistics.median(times), "faults": statistics.median(faults)}


def worker(case: str, steps: int) -> dict:
    kind, value = case.split(":")
    if kind == "build":
        return {"seconds": build_seconds(int(value))}
    return head_step(value, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="processes per case and page size, interleaved")
    parser.add_argument("--steps", type=int, default=100, help="timed head steps per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    print(f"machine: {machine_line('cpu')}, load average at start: {load_average()}")
    cases = [f"build:{width}" for width in WIDTHS] + ["head:nn.Linear", "head:KeptGradLinear"]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for case in cases:
            for pages, value in PAGES.items():
                env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
                out = subprocess.run([sys.executable, __file__, "--worker", case, "--steps", str(args.steps)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                results.setdefault((case, pages), []).append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for case in cases:
        kind, value = case.split(":")
        row = [f"VGG16 random, fc {value}" if kind == "build" else f"head step, first layer {value}"]
        figures = {}
        for pages in PAGES:
            runs = results[(case, pages)]
            if kind == "build":
                figures[pages] = statistics.median(r["seconds"] for r in runs)
                row.append(f"{figures[pages]:.1f} s")
            else:
                figures[pages] = statistics.median(r["median_s"] for r in runs)
                row.append(f"{figures[pages] * 1e3:.1f} ms ({statistics.median(r['faults'] for r in runs):.0f} faults)")
        row.append(f"{figures['huge'] / figures['4 KiB']:.2f}")
        rows.append(row)
    print(f"{args.rounds} fresh processes per case and page size (medians):")
    print(table(["case", "4 KiB pages", "huge pages", "huge / 4 KiB"], rows))
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
