"""Figures the stages log to MLflow and save for DVC: training curves, ROC curve, confusion matrix, and grids of
test images beside their Grad-CAM heatmaps; and xfer search's Optuna figures (history, parameter importances)."""

from __future__ import annotations

import json
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


def explained_grid(images: np.ndarray, overlays: list[np.ndarray], titles: list[str], out, empty: str) -> None:
    """Save a PNG grid, two examples per row: each image (0-255) beside its heatmap overlay, titled; ``empty`` is
    written instead when there is no image."""
    plt = _pyplot()
    per_row = 2
    rows = max(1, -(-len(images) // per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.6 * 2 * per_row, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (image, blended, title) in enumerate(zip(images, overlays, titles, strict=True)):
        left, right = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        left.imshow(np.asarray(image).astype(np.uint8))
        left.set_title(title, fontsize=8)
        right.imshow(blended)
        right.set_title("Grad-CAM", fontsize=8)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)


def log_figure(fig, name: str, parent: bool = False) -> None:
    """Log a figure to the active MLflow run (and to its pipeline's parent run), then close it."""
    import mlflow

    from xfer.core.retry import retry_locked

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    retry_locked(client.log_figure, run.info.run_id, fig, name)
    parent_id = run.data.tags.get("mlflow.parentRunId") if parent else None
    if parent_id:
        retry_locked(client.log_figure, parent_id, fig, name)
    _pyplot().close(fig)


def log_study_figures(client, run_id: str, study) -> list[str]:
    """Optuna's optimization history and (with two or more complete trials) parameter importances, as figures of
    the study's MLflow parent run; return the names logged."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    from xfer.core.retry import retry_locked

    plt = _pyplot()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    logged = []
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True, default=str) for t in complete}) >= 2:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    for name, plot in plots:
        try:
            ax = plot(study)
        except (ValueError, RuntimeError):  # e.g. importances of parameters that never varied
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        retry_locked(client.log_figure, run_id, fig, name)
        plt.close(fig)
        logged.append(name)
    return logged
