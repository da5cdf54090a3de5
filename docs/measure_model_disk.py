"""What a registered image classifier costs on disk, and what storing its backbone in bf16 changes
in the scores it serves (the figures of docs/readme-issue13.md).

    .venv/bin/python docs/measure_model_disk.py [relu7 fc6 pool5]

Into a scratch store under /tmp (never the project's mlruns/): a 3-class image folder (14
images per class, 10 for training), random VGG16 weights at 32 px (the model's size does not
depend on either), an svm head per layer. For each layer it logs the servable model twice, with
the backbone stored in fp32 and in bf16, and compares the scores both serve on the 12 test images:
in the serving precision this machine picks (bf16 where it is native) and forced to fp32 (a
machine without native bf16). First, into the empty store, it registers three versions of the
relu7 model and prints how much the store's artifacts grew with each (``du -sb`` counts a hard-linked file once).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRATCH = Path("/tmp/scenesweep-disk")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
shutil.rmtree(SCRATCH / "store", ignore_errors=True)
(SCRATCH / "store" / "artifacts").mkdir(parents=True)
os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{SCRATCH / 'store' / 'mlflow.db'}", "SCENESWEEP_OFFLINE": "1",
                   "TQDM_DISABLE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from conftest import CLASSES, make_image  # noqa: E402

from scenesweep.compute.features import cpu_has_native_bf16  # noqa: E402
from scenesweep.compute.training import fit_head, prepare  # noqa: E402
from scenesweep.core.config import make_config  # noqa: E402
from scenesweep.models import logged, pyfunc  # noqa: E402
from scenesweep.models.registry import register_result  # noqa: E402
from scenesweep.tracking.mlflow_store import setup_tracking  # noqa: E402


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_bytes() -> int:
    return int(subprocess.run(["du", "-sb", str(SCRATCH / "store" / "artifacts")], capture_output=True,
                              text=True).stdout.split()[0])


def scores(uri: str, frame: pd.DataFrame, fp32: bool = False) -> np.ndarray:
    chosen = pyfunc.serving_precision
    if fp32:
        pyfunc.serving_precision = lambda trained, device: "fp32"
    try:
        out = mlflow.pyfunc.load_model(uri).predict(frame)
    finally:
        pyfunc.serving_precision = chosen
    return out[[f"score_{c}" for c in CLASSES]].to_numpy()


def fitted(layer: str, C: float = 1.0):
    config = make_config("svm", {"data": str(SCRATCH / "scenes"), "train_per_class": 10, "layer": layer,
                                 "image_size": 32, "cache_dir": str(SCRATCH / "cache"), "C": C})
    return fit_head(prepare(config, progress=False), config)


def main(layers: list[str]) -> None:
    setup_tracking()
    if not (SCRATCH / "scenes").exists():
        for label, name in enumerate(CLASSES):
            for index in range(14):
                make_image(SCRATCH / "scenes" / name / f"{name}_{index:02d}.png", label, index,
                           "RGB" if index % 3 == 0 else "L")
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    before = store_bytes()  # first: the first version's backbone is new to the store
    for C in (1.0, 0.1, 0.01):  # three versions, one backbone
        result = fitted("relu7", C)
        result.metrics["test/acc"] = float("nan")
        with mlflow.start_run() as run:
            version = register_result(run.info.run_id, result, "scene-classifier")
        now = store_bytes()
        print(f"relu7 version {version}: the store's artifacts grew by {(now - before) / 1e6:.2f} MB")
        before = now

    storage = logged.storage_precision
    for layer in layers:
        result = fitted(layer)
        paths = [result.prepared.dataset.absolute(int(i)) for i in result.prepared.split.test]
        frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
        row, uris = {"layer": layer, "extraction": result.prepared.features.precision}, {}
        with mlflow.start_run(run_name=f"disk {layer}"):
            for stored in ("fp32", "bf16"):
                logged.storage_precision = lambda precision, s=stored: s
                try:
                    uris[stored] = logged.log_image_classifier(result, name=f"model_{stored}").model_uri
                finally:
                    logged.storage_precision = storage
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uris[stored]))
                row[f"{stored} model MB"] = round(folder_bytes(local) / 1e6, 2)
                row[f"{stored} backbone.pt MB"] = round(folder_bytes(local / "artifacts" / "backbone.pt") / 1e6, 2)
        row["code MB"] = round(folder_bytes(local / "code") / 1e6, 2)
        for serving, fp32 in (("served as chosen", False), ("served in fp32", True)):
            a, b = scores(uris["fp32"], frame, fp32), scores(uris["bf16"], frame, fp32)
            row[f"{serving}: max |score fp32-stored - bf16-stored|"] = float(np.abs(a - b).max())
            row[f"{serving}: labels agree"] = f"{int((a.argmax(1) == b.argmax(1)).sum())}/{len(paths)}"
        row["max |score|"] = float(np.abs(a).max())
        print(json.dumps(row, indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["relu7", "fc6", "pool5"])
