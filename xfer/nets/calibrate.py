"""Temperature scaling: one scalar T > 0 fitted on the validation probabilities (minimum negative log-likelihood)
and applied to the reported probabilities, the registered model and ``xfer predict``.

Probabilities become logits (log p for a softmax, logit p for a sigmoid's class-1 probability, i.e. log p minus a
constant per row), are divided by T and turned back into probabilities: the ranking of the classes, and so every
predicted class, stays the same. ``models/calibration.json`` holds ``{"temperature": T, ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xfer import XferError

CALIBRATE_CHOICES = ("temperature", "none")
EPS = 1e-12
LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]: far beyond any sensible model


def check_method(method: str | None) -> str:
    """``temperature`` or ``none`` (one-line error otherwise)."""
    method = "none" if method is None else str(method)
    if method not in CALIBRATE_CHOICES:
        raise XferError(f"evaluate.calibrate: '{method}' is not one of {', '.join(CALIBRATE_CHOICES)}")
    return method


def _matrix(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    return np.hstack([1 - p, p]) if p.shape[1] == 1 else p / p.sum(axis=1, keepdims=True)


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (n, k), or a sigmoid's (n, 1), with their logits divided by ``temperature``; same shape out."""
    p = np.asarray(probs, dtype=np.float64)
    if float(temperature) == 1.0:
        return p
    m = _matrix(p)
    logits = np.log(np.clip(m, EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    out /= out.sum(axis=1, keepdims=True)
    return out[:, 1:] if (p.ndim == 2 and p.shape[1] == 1) else out


def nll(y: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under the temperature-scaled probabilities."""
    p = _matrix(scale(probs, temperature))
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), np.asarray(y, dtype=int)], EPS, 1.0))))


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """The T > 0 minimizing the validation NLL (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        raise XferError("evaluate.calibrate: no validation rows to fit the temperature on")
    result = minimize_scalar(lambda log_t: nll(y, probs, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibrate(method: str, y_val: np.ndarray | None, p_val: np.ndarray | None, path: str | Path) -> float:
    """Fit the temperature (``method: temperature``) on the validation labels and probabilities, or take 1.0
    (``none``); write ``path`` (``{"temperature": T, "method": ..., "val_nll_before": ..., "val_ece_after": ...}``,
    rounded so that the same probabilities give the same bytes) and return the rounded T."""
    from xfer.core.files import write_json
    from xfer.track.metrics import expected_calibration_error

    method = check_method(method)
    report: dict = {"method": method}
    temperature = 1.0
    if method == "temperature":
        temperature = round(fit_temperature(y_val, p_val), 6)
        for when, t in (("before", 1.0), ("after", temperature)):
            report[f"val_nll_{when}"] = round(nll(y_val, p_val, t), 6)
            report[f"val_ece_{when}"] = round(expected_calibration_error(y_val, scale(p_val, t)), 6)
    write_json(path, {"temperature": temperature, **report})
    return temperature


def read_temperature(path: str | Path) -> float:
    """The temperature in a calibration file; 1.0 when there is none (a model evaluated before calibration)."""
    path = Path(path)
    if not path.is_file():
        return 1.0
    try:
        t = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError) as exc:
        raise XferError(f"{path}: no valid 'temperature' ({exc}); rerun the evaluate stage") from None
    if not np.isfinite(t) or t <= 0:
        raise XferError(f"{path}: temperature {t} is not a positive number; rerun the evaluate stage")
    return t
