"""Classification metrics from predicted probabilities, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def as_matrix(probs: np.ndarray) -> np.ndarray:
    """(n, 1) sigmoid outputs -> (n, 2) class probabilities; (n, k) softmax outputs renormalised (float32
    rounding) to sum to one."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.hstack([1 - probs, probs]) if probs.shape[1] == 1 else probs / probs.sum(axis=1, keepdims=True)


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-label confidence: bin-size-weighted |accuracy - confidence| over equal-width bins."""
    p = as_matrix(probs)
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(int)
    if correct.min() == correct.max():  # calibration_curve needs both outcomes
        return float(abs(correct.mean() - confidence.mean()))
    acc, conf = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.bincount(np.clip(np.searchsorted(edges[1:-1], confidence, side="right"), 0, n_bins - 1),
                         minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / counts.sum() * np.abs(acc - conf)))


def _rows_summing_to_one(p: np.ndarray) -> np.ndarray:
    """Probabilities clipped away from 0 and renormalised per row: a float16 or int8 runtime's (or bfloat16
    model's) rows sum to one only up to their rounding, which scikit-learn's log loss warns about."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1)
    return q / q.sum(axis=1, keepdims=True)


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, log loss, ROC AUC, per-class and macro precision/recall/F1, confusion matrix, ECE."""
    p = as_matrix(probs)
    labels = list(range(len(classes)))
    pred = p.argmax(axis=1)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    try:
        auc = roc_auc_score(y, p[:, 1]) if len(classes) == 2 else roc_auc_score(y, p, multi_class="ovr",
                                                                                labels=labels)
    except ValueError:  # a single class in y
        auc = float("nan")
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "loss": float(log_loss(y, _rows_summing_to_one(p), labels=labels)),
        "auc": float(auc),
        "ece": expected_calibration_error(y, probs),
        "precision_macro": float(macro[0]), "recall_macro": float(macro[1]), "f1_macro": float(macro[2]),
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def roc_points(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of the positive class (binary) or micro-averaged one-vs-rest (more classes)."""
    p = as_matrix(probs)
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:
        onehot = np.eye(p.shape[1])[y]
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr
