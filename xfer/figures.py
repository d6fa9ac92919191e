"""Figures the stages log to MLflow and save for DVC: training curves, ROC curve, confusion matrix, and the grid of
misclassified images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(curves_csv: Path, title: str):
    """Loss and accuracy per epoch, training against validation (the CSVLogger file of a fit)."""
    plt = _pyplot()
    frame = pd.read_csv(curves_csv)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    epochs = frame["epoch"] + 1 if "epoch" in frame else np.arange(1, len(frame) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for column, style in ((metric, "o-"), (f"val_{metric}", "s--")):
            if column in frame and len(frame):
                ax.plot(epochs, frame[column], style, label="validation" if column.startswith("val_") else "training")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auc: float):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve (test)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: list[list[int]], classes: list[str]):
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.4, 1.2 * len(classes) + 1.8))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    return fig


def misclassified_grid(paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str], n: int,
                       out) -> int:
    """Save a grid of the ``n`` most confidently wrong images (true / predicted class and probability)."""
    from PIL import Image

    plt = _pyplot()
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = [i for i in np.argsort(-conf) if pred[i] != y[i]][:n]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        with Image.open(paths[i]) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred[i]]} ({conf[i]:.2f})", fontsize=9)
    if not wrong:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return len(wrong)


def log_figure(fig, name: str, parent: bool = False) -> None:
    """Log a figure to the active MLflow run (and to its pipeline's parent run), then close it."""
    import mlflow

    from xfer.store import retry_locked

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    retry_locked(client.log_figure, run.info.run_id, fig, name)
    parent_id = run.data.tags.get("mlflow.parentRunId") if parent else None
    if parent_id:
        retry_locked(client.log_figure, parent_id, fig, name)
    _pyplot().close(fig)
