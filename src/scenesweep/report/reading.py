"""Reading what a run holds, and writing it the way the report shows it (percentages, seconds,
stability, Markdown tables)."""
from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from ..core.config import ARCHS, LAYERS, POOLINGS
from ..core.machine import hardware_summary
from .finding import Found, resolved_params

STABILITY_EPOCHS = 5  # stability: spread of val/acc over the last epochs
STABLE_SPREAD = 0.02  # a spread up to 2 percentage points counts as stable
DEMO_LABEL = "DEMO"
# The order in which group values are listed (the registries' own order where there is one).
GROUP_ORDER = {"pooling": POOLINGS, "layer": LAYERS, "arch": ARCHS}


def hardware_text(tags: dict[str, str]) -> str:
    """The machine a run ran on, in one line, from its ``hardware.*`` tags (CPU model and speed
    flags, torch's CPU capability, cores, threads, memory, device; the GPU on CUDA)."""
    if not tags.get("hardware.cpu"):
        return "not recorded"
    return hardware_summary({k[len("hardware."):]: v for k, v in tags.items() if k.startswith("hardware.")})


def setting_text(found: Found, params: dict[str, str]) -> str:
    """What the figures were measured on, with the demo label when they are demo figures."""
    shown = [f"{k}={params[k]}" for k in ("data", "weights", "image_size", "train_per_class", "batch_size")
             if k in params]
    if not found.experiment.uses_data:
        shown = [s for s in shown if not s.startswith(("data=", "train_per_class="))]
    if found.setting == "demo":
        return (f"**{DEMO_LABEL}** ({', '.join(shown)}): a demo figure, not a 15-Scene result")
    return f"real setting ({', '.join(shown)})"


def run_params(run) -> dict[str, str]:
    """Run parameters as resolved (``finding.resolved_params``): what the setting line shows."""
    return resolved_params(run)


def download(run_id: str, path: str, target: Path) -> Path | None:
    """An artifact file or folder of a run, copied under ``target``; None when it is missing."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                         dst_path=str(target)))
    except Exception:  # a missing artifact: the report says so instead of failing
        return None
    return local if local.exists() else None


def history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a per-epoch metric, sorted by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def epoch_summary(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Best epoch by val/acc and the stability of val/acc over the last epochs (empty for an SVM)."""
    val = history(client, run_id, "val/acc")
    if len(val) < 2:
        return {}
    steps, values = zip(*val)
    best = int(np.argmax(values))
    last = values[-min(STABILITY_EPOCHS, len(values)):]
    spread = max(last) - min(last)
    return {"best_epoch": steps[best], "best_val": values[best], "epochs": steps[-1], "spread": spread,
            "stable": spread <= STABLE_SPREAD, "train": history(client, run_id, "train/acc"), "val": list(val)}


def pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * float(value):.2f} %"


def seconds(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.3g}"


def extraction_batch_s(run: Any) -> float | None:
    """Seconds per extraction batch of the features a run used: its own extraction, or for a
    cache hit the extraction that filled the cache (tag ``cache.extraction_batch_mean_s``)."""
    if "time/extract_batch_mean_s" in run.data.metrics:
        return run.data.metrics["time/extract_batch_mean_s"]
    tagged = run.data.tags.get("cache.extraction_batch_mean_s")
    return float(tagged) if tagged else None


def extraction_images_per_s(run: Any) -> float | None:
    """Images per second of the extraction behind a run's features (its own, or the one that
    filled the cache), as ``extraction_batch_s``."""
    if "time/extract_images_per_s" in run.data.metrics:
        return run.data.metrics["time/extract_images_per_s"]
    tagged = run.data.tags.get("cache.extraction_images_per_s")
    return float(tagged) if tagged else None


def stability_text(summary: dict) -> str:
    if not summary:
        return "–"
    n = min(STABILITY_EPOCHS, summary["epochs"])
    return f"{'yes' if summary['stable'] else 'no'} (spread {100 * summary['spread']:.1f} pp, last {n} epochs)"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def when(milliseconds: int | None) -> str:
    if not milliseconds:
        return "?"
    return datetime.datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M")
