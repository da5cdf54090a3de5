"""Write a synthetic 15-Scene-shaped folder (``scenesweep.synthetic``) for benchmarks and trials.

The 15 classes of 15-Scene with their real image counts (4485 images at ``--scale 1``), laid out
flat as ``DIR/<class>/image_NNNN.jpg``: grayscale JPEGs of about 250 x 300 px whose classes differ
in texture. Deterministic from ``--seed``; written into a temporary folder renamed into place, so
an interrupted run leaves nothing at DIR.

Usage:
    .venv/bin/python benchmarks/make_scenes.py DIR [--scale S] [--seed N] [--workers W] [--exist-ok]

Examples:
    .venv/bin/python benchmarks/make_scenes.py /tmp/scenes                 # all 4485 images
    .venv/bin/python benchmarks/make_scenes.py /tmp/scenes-small --scale 0.03

Bad input (DIR exists, a bad scale) is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run from a checkout without installing: put src/ on the path when scenesweep is not importable.
try:
    import scenesweep  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scenesweep.compute import synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dir", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"fraction of each class's real count (1: {synthetic.TOTAL_IMAGES} images); "
                             f"at least {synthetic.MIN_PER_CLASS} per class")
    parser.add_argument("--seed", type=int, default=0, help="the images are a function of it")
    parser.add_argument("--workers", type=int, default=None,
                        help="writing processes (default: the cores available); the images do not depend on it")
    parser.add_argument("--exist-ok", action="store_true",
                        help="succeed without writing when DIR already holds the same generated dataset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    try:
        existed = synthetic.read_marker(args.dir) is not None
        root = synthetic.write_scenes(args.dir, scale=args.scale, seed=args.seed, workers=args.workers,
                                      exist_ok=args.exist_ok)
    except (FileExistsError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - began
    marker = synthetic.read_marker(root) or {}
    counts = marker.get("counts", {})
    total = sum(counts.values())
    size_bytes = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    if existed and args.exist_ok:
        print(f"{root}: already holds this dataset ({total} images, seed {args.seed}, scale {args.scale:g}); "
              "nothing written")
        return 0
    print(f"{root}: {total} grayscale JPEGs in {len(counts)} classes, seed {args.seed}, scale {args.scale:g}, "
          f"{size_bytes / 1e6:.1f} MB; written in {seconds:.1f} s ({total / seconds:.0f} images/s, "
          f"{marker.get('workers', '?')} workers)")
    print("  " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
