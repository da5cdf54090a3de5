"""Why a head step takes the time it does on CPU, and whether the bare loop is a floor real runs cannot beat.

The study's head (25088-1024-1024-15, dropout 0.5, Adam fused, batch 8) is stepped by the bare
PyTorch loop of ``floor.head_step`` on

* random normal features (what ``floor.py`` steps on),
* real pool5 features of the same images under each VGG pooling type (max, avg, lp1, lp2), from a
  random-weight VGG16 at 224 px (``--data``: an image folder, e.g. ``make_scenes.py``'s),

each in a fresh process with 4 KiB pages and with huge pages for buffers of 2 MiB and more
(PyTorch's ``THP_MEM_ALLOC_ENABLE``, which ``scenesweep.compute.numerics`` turned on until
``compute/mlp_layers.py`` kept the head's gradient: ``huge_pages.py`` measures both), rounds
interleaved. Per case: the median and best step, and the minor page faults per step. Then the
package's own ``MLPHead`` is fitted on the real features of each pooling, in the same processes,
and its logged median step is set beside the bare loop's best step (the floor).

    .venv/bin/python benchmarks/head_floor.py --data /tmp/scenes [--images 64] [--steps 40] [--rounds 2]

It answers issue 29's question (the avg and lp1 settings of the pooling study stepped faster than
the bare loop on random features): if the features' values mattered, the rows would differ by
pooling; if the allocator does, the two page sizes differ and the poolings do not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # floor.py, _common.py
from _common import load_average, table  # noqa: E402

POOLINGS = ("max", "avg", "lp1", "lp2")
HEAD = (25088, 1024, 1024, 15)


def extract(data: Path, images: int, image_size: int, out: Path) -> None:
    """pool5 features (N, 25088) of ``images`` images of ``data`` for each pooling type -> out (.npz)."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from scenesweep.compute.family_code import PoolingBranches

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    branches = PoolingBranches(vgg.features, POOLINGS).eval()
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(0).shuffle(files)
    files = files[:images]
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize((image_size, image_size)), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    pooled = {p: [] for p in POOLINGS}
    with torch.inference_mode():
        for start in range(0, len(files), 8):
            x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start:start + 8]])  # (B, 3, S, S)
            for pooling, maps in zip(POOLINGS, branches(x)):  # each (B, 512, S/32, S/32)
                pooled[pooling].append(torch.nn.functional.adaptive_avg_pool2d(maps, 7).flatten(1))  # (B, 25088)
    np.savez(out, **{p: torch.cat(v).numpy() for p, v in pooled.items()})


def time_cases(features_file: Path, steps: int) -> list[dict]:
    """In this process: the bare loop on random and on each pooling's features, then MLPHead on each."""
    import numpy as np
    import torch

    import floor
    from scenesweep.compute.heads import MLPHead

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    real = dict(np.load(features_file))
    results = []
    for name in ("random", *POOLINGS):
        x = None if name == "random" else torch.from_numpy(real[name])
        before = faults()
        step = floor.head_step(HEAD, 8, device="cpu", steps=steps, features=x, op_ceiling=False)
        results.append({"case": f"bare loop, {name} features", "median_s": step.median_s, "best_s": step.min_s,
                        "faults_per_step": (faults() - before) / (steps + 3), **step.settings})
    labels = np.arange(len(next(iter(real.values())))) % HEAD[-1]
    for name in POOLINGS:
        before = faults()
        head = MLPHead(hidden="1024,1024", dropout=0.5, epochs=max(1, steps * 8 // len(labels)), batch_size=8,
                       device="cpu", progress=False, precision="fp32").fit(real[name], labels)
        timing = head.train_timing_
        n_steps = sum(1 for _ in range(0, len(labels), 8)) * head.epochs
        results.append({"case": f"MLPHead.fit, {name} features", "median_s": timing["batch_median_s"],
                        "best_s": None,  # the package logs the median, mean and p95 of its steps
                        "faults_per_step": (faults() - before) / n_steps})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder (e.g. make_scenes.py's)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per bare loop")
    parser.add_argument("--rounds", type=int, default=2, help="processes per page size, interleaved")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(time_cases(args.worker, args.steps)))
        return 0
    from scenesweep.compute import hardware

    print(f"machine: {hardware.describe('cpu')}")
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        features_file = Path(tmp) / "pool5.npz"
        extract(args.data, args.images, args.image_size, features_file)
        rows: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.rounds):
            for pages in ("4 KiB", "huge"):
                env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if pages == "huge" else "0"}
                out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--steps", str(args.steps),
                                      "--worker", str(features_file)], env=env, capture_output=True, text=True,
                                     check=True).stdout
                for result in json.loads(out.strip().splitlines()[-1]):
                    rows.setdefault((result["case"], pages), []).append(result)
    floor_best = {pages: min(r["best_s"] for (case, p), rs in rows.items() if p == pages and case.startswith("bare")
                             for r in rs) for pages in ("4 KiB", "huge")}
    printed = []
    for (case, pages), results in rows.items():
        median = statistics.median(r["median_s"] for r in results)
        best = [r["best_s"] for r in results if r["best_s"] is not None]
        printed.append([case, pages, f"{median * 1e3:.1f}", f"{min(best) * 1e3:.1f}" if best else "-",
                        f"{statistics.median(r['faults_per_step'] for r in results):.0f}",
                        f"{median / floor_best[pages]:.2f}"])
    printed.sort(key=lambda r: (r[1], r[0]))
    print(f"head {'-'.join(map(str, HEAD))}, batch 8, Adam fused, {args.images} images at {args.image_size} px "
          f"(random-weight VGG16), {args.rounds} processes per page size:")
    print(table(["case", "pages", "median ms/step", "best ms/step", "minor faults/step", "median / floor"], printed))
    print(f"   floor: the bare loop's best step over every feature kind: 4 KiB pages {floor_best['4 KiB'] * 1e3:.1f} ms, "
          f"huge pages {floor_best['huge'] * 1e3:.1f} ms ({floor_best['4 KiB'] / floor_best['huge']:.2f}x)")
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
