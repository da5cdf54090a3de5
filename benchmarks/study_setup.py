"""What every stage of one study benchmark shares, and how it is prepared: the experiments
chosen, the weights, the processes' environment and their checked commands (``Setup``).

Part of ``benchmarks/study.py``.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/floor.py, _common.py
from _common import REPO  # noqa: E402
from study_runs import Stage, check_stage, scenesweep_command  # noqa: E402

EXPERIMENTS = REPO / "experiments"


def natural_key(path: Path) -> tuple:
    """q1 < q3 < q8 < q12_1 < q12_2: numbers compared as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def imagenet_weights_present() -> Path | None:
    """torchvision's cached VGG16 ImageNet checkpoint, when present (nothing is downloaded)."""
    try:
        from scenesweep.compute.backbone import imagenet_checkpoint  # where scenesweep itself looks

        path = Path(imagenet_checkpoint())
    except Exception:  # noqa: BLE001 - the package moved: fall back to torchvision's default place
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    return path if path.is_file() else None


def select_experiments(tokens: str | None) -> list[Path]:
    files = sorted(EXPERIMENTS.glob("*.yaml"), key=natural_key)
    if not tokens:
        return files
    chosen = []
    for token in [t.strip() for t in tokens.split(",") if t.strip()]:
        matches = [f for f in files if f.stem == token or f.stem.startswith(token + "_")]
        if not matches:
            raise ValueError(f"--experiments {token}: no experiments/{token}*.yaml; expected some of: "
                             + ", ".join(f.stem for f in files))
        chosen += [m for m in matches if m not in chosen]
    return sorted(chosen, key=natural_key)


@dataclass
class Setup:
    """What every stage of one benchmark shares: the data, the stages' checked commands, the
    weights, the environment of the processes, and where stores, cache, logs and report go."""

    command_line: str
    started_at: str
    load_start: list[float] | None
    data: Path
    weights: str
    stages: list[Stage]
    env: dict
    store: Path
    cache: Path
    logs: Path
    out: Path | None


def chosen_weights(asked: str) -> str:
    """``auto``: ImageNet's when torchvision's cache holds the checkpoint, else random; printed."""
    checkpoint = imagenet_weights_present()
    weights = ("imagenet" if checkpoint else "random") if asked == "auto" else asked
    print(f"weights: {weights}" + (f" ({checkpoint})" if weights == "imagenet" and checkpoint else
                                   " (no ImageNet checkpoint in torchvision's cache)" if not checkpoint else ""))
    return weights


def stage_environment(store: Path) -> dict:
    """The experiments' environment: this store, no run or experiment inherited, no progress bars.
    This process reads the same store."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{(store / 'mlflow.db').as_posix()}",
                "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")})
    return env


def checked_stages(files: list[Path], extra_groups: list[list[str]], env: dict) -> list[Stage] | None:
    """Every stage's command, checked (``--check``) before anything runs; None if one fails."""
    base = scenesweep_command() + ["run"]
    stages = [Stage(f) for f in files]
    failed = [f"{stage.name}: {error}" for stage in stages
              if (error := check_stage(stage, base, extra_groups, env))]
    if failed:
        print("error: an experiment does not check; nothing was run:\n  " + "\n  ".join(failed), file=sys.stderr)
        return None
    for stage in stages:
        print(f"  {stage.name}: {' '.join(shlex.quote(t) for t in stage.command)}"
              + (f"   [dropped here: {', '.join(stage.dropped)}]" if stage.dropped else ""))
    return stages
