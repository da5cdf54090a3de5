"""Figures logged as PNG artifacts (and drawn into the report): the confusion matrix, the
per-epoch curves of one run or of several side by side, the first convolution's maps."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(confusion: np.ndarray, classes: tuple[str, ...], title: str):
    """Row-normalised confusion matrix as a figure (counts printed in the cells)."""
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def curves_figure(series: dict[str, list[dict]], title: str):
    """Per-epoch curves: accuracy (and cross-entropy, where the histories hold it), validation
    solid and training dashed, one colour per series.

    Args:
        series: label -> history, a list of dicts with "epoch" and any of "train/acc",
            "val/acc", "train/loss", "val/loss" (one run: ``{"": result.history}``).
        title: the figure's title.
    """
    has_loss = any("val/loss" in h or "train/loss" in h for history in series.values() for h in history)
    panels = ("loss", "acc") if has_loss else ("acc",)
    fig, axes = plt.subplots(1, len(panels), figsize=(10 if has_loss else 8, 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for index, (label, history) in enumerate(series.items()):
            for split, style in (("val", "-"), ("train", "--")):
                points = [(h["epoch"], h[f"{split}/{panel}"]) for h in history if f"{split}/{panel}" in h]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{index}", alpha=1.0 if split == "val" else 0.6,
                            label=f"{label} {split}".strip())
        if panel == "acc":
            ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
        else:
            ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def featuremap_figure(image: np.ndarray, maps: np.ndarray, title: str, binary: bool = False):
    """The input image beside its 64 maps in an 8 x 8 grid.

    Args:
        image: (S, S, 3) in [0, 1], what the network saw.
        maps: (64, S, S) activations, or booleans when ``binary``.
    """
    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(8, 12, wspace=0.08, hspace=0.3)
    ax = fig.add_subplot(grid[1:6, 0:4])
    ax.imshow(image)
    ax.set_title("input (resized, cropped)")
    ax.axis("off")
    for index in range(min(64, len(maps))):
        cell = fig.add_subplot(grid[index // 8, 4 + index % 8])
        # Each map on its own scale (raw) so that weak filters stay visible; binary: on/off.
        cell.imshow(maps[index], cmap="gray" if binary else "viridis", vmin=0 if binary else None,
                    vmax=1 if binary else None, interpolation="nearest")
        cell.set_xticks([])
        cell.set_yticks([])
        cell.set_title(str(index), fontsize=6, pad=1)
    fig.suptitle(title)
    return fig


def log_figure(fig, path: str, run_id: str) -> None:
    """Log a figure as a PNG artifact of ``run_id``, then close it. The run is named, never the
    fluent active one: with none active, MLflow's fluent call would start a new, stray run."""
    mlflow.MlflowClient().log_figure(run_id, fig, path)
    plt.close(fig)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure as a PNG file (the report's figures), then close it."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
