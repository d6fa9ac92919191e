"""Paths of the pipeline's files (mirrored in dvc.yaml) and readers for what the stages hand on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xfer import XferError

RAW = Path("data/raw")
IMAGES = RAW / "images"
CLASSES = RAW / "classes.json"
SPLITS = Path("data/splits")
FEATURES = Path("data/features")
VIEWS = Path("data/views")
TRUNK = Path("data/trunk")
MODELS = Path("models")
HEAD_MODEL = MODELS / "head.keras"
FINAL_MODEL = MODELS / "model.keras"
CALIBRATION = MODELS / "calibration.json"  # evaluate's temperature (xfer.nets.calibrate)
# evaluate's final test probabilities (calibrated, with TTA; test manifest order): export's reference
TEST_PROBABILITIES = MODELS / "test_probabilities.npy"
REPORTS = Path("reports")
METRICS = REPORTS / "metrics"
PLOTS = REPORTS / "plots"
RUNS = REPORTS / "runs"
SPLIT_NAMES = ("train", "val", "test")


def read_manifest(split: str) -> pd.DataFrame:
    """The manifest of one split: columns path (relative to data/raw/images), label, class, sha256."""
    path = SPLITS / f"{split}.csv"
    if not path.is_file():
        raise XferError(f"{path} not found; run the split stage first (dvc repro split)")
    return pd.read_csv(path)


def image_paths(manifest: pd.DataFrame) -> list[str]:
    return [str(IMAGES / p) for p in manifest["path"]]


def feature_dir(backbone: str) -> Path:
    return FEATURES / backbone


def load_features(backbone: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped cached features and labels of one split (no pickle)."""
    d = feature_dir(backbone)
    x_path, y_path = d / f"{split}_features.npy", d / f"{split}_labels.npy"
    for p in (x_path, y_path):
        if not p.is_file():
            raise XferError(f"{p} not found; run the featurize stage for backbone '{backbone}' first")
    return np.load(x_path, mmap_mode="r", allow_pickle=False), np.load(y_path, allow_pickle=False)


def views_dir(backbone: str) -> Path:
    return VIEWS / backbone


def trunk_dir(backbone: str) -> Path:
    return TRUNK / backbone


def load_training_features(backbone: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The training rows for the head: the cached train features, followed by the augmented views of the
    views stage when there are any (featurize.train_views > 0); also returns the number of views."""
    x, y = load_features(backbone, "train")
    path = views_dir(backbone) / "train_features.npy"
    if not path.is_file():
        return x, y, 0
    xv = np.load(path, mmap_mode="r", allow_pickle=False)
    yv = np.load(views_dir(backbone) / "train_labels.npy", allow_pickle=False)
    if xv.shape[1:] != x.shape[1:] or len(xv) % max(len(x), 1):
        raise XferError(f"{path}: views {xv.shape} do not match the train features {x.shape}; rerun the views "
                        "stage (dvc repro views)")
    return np.concatenate([x, xv]), np.concatenate([y, yv]), len(xv) // max(len(x), 1)
