"""Hyperparameter search on the cached features: the space (``conf/search/<name>.yaml``) and the k-fold
cross-validated objective that runs train_head's own fit (xfer.nets.models.fit_head), then, in a space with
``finetune.*`` keys, the finetune stage's (xfer.nets.tuning); xfer.nets.study runs the Optuna study,
xfer.core.presets writes the winner as an experiment preset.

The folds cover the training and validation images together (the head's augmented training views, when a trial
uses some, join the training folds of their images only); the test split is never read. The head's pooling is done
once up front: a GAP or Flatten head on pooled/flattened features is the same function as on the feature maps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from xfer import XferError
from xfer.core.config import CONF_DIR, project_root

SEARCHABLE = ("head.", "finetune.")  # sections a trial can change on the current cache
CACHED_VIEWS_KEY = "featurize.train_views"
TRUNK_VIEWS_KEY = "finetune.trunk_views"
BOUNDARY_KEY = "backbone.unfreeze_from"
NEEDS_FEATURES = ("backbone.", "featurize.", "data.", "split.")
NEEDS_TRUNK_VIEWS = ("finetune.augment",)
STEPS_PER_EXECUTION = 64  # a fold's batches run 64 per compiled call: the same updates, far less Python per batch
OPTIONS = ("folds", "trials", "max_epochs", "patience", "finetune_max_epochs", "startup_trials", "significance",
           "space")


@dataclass
class Space:
    """A parsed search space: distributions by params.yaml key, and the CV / budget settings."""

    name: str
    params: dict[str, dict]
    folds: int = 5
    trials: int = 30
    max_epochs: int | None = None
    patience: int | None = None
    startup_trials: int = 5
    significance: float = 2.0
    source: str = ""
    extra: dict = field(default_factory=dict)
    finetune_max_epochs: int | None = None

    @property
    def fine_tunes(self) -> bool:
        """A space with ``finetune.*`` keys: its trials (and the starting params) fine-tune where they say so."""
        return any(k.startswith("finetune.") for k in self.params)

    def trunk_views(self, cfg: DictConfig) -> int:
        """The most trunk views a trial (or the starting params) trains on."""
        d = self.params.get(TRUNK_VIEWS_KEY, {})
        values = d.get("choices") or ([d["high"]] if "high" in d else [])
        return max([int(cfg.finetune.trunk_views), *map(int, values)])

    def suggest(self, trial) -> dict[str, Any]:
        """One point: a value for every key, drawn by the trial."""
        point = {}
        for key, d in self.params.items():
            if "choices" in d:
                point[key] = trial.suggest_categorical(key, list(d["choices"]))
            elif d.get("int"):
                point[key] = trial.suggest_int(key, int(d["low"]), int(d["high"]), log=bool(d.get("log")))
            else:
                point[key] = trial.suggest_float(key, float(d["low"]), float(d["high"]), log=bool(d.get("log")))
        return point


def space_path(name: str, root: Path | None = None) -> Path:
    """``conf/search/<name>.yaml`` (or a path to a yaml file)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    return (root or project_root()) / CONF_DIR / "search" / f"{name}.yaml"


def _check_point(where: str, key: str, d: Any) -> dict:
    if not isinstance(d, dict) or not (("choices" in d) ^ ({"low", "high"} <= set(d))):
        raise XferError(f"{where}: {key}: give either {{choices: [...]}} or {{low: L, high: H}} (log: true, int: true "
                        "optional)")
    unknown = set(d) - {"choices", "low", "high", "log", "int"}
    if unknown:
        raise XferError(f"{where}: {key}: unknown setting '{sorted(unknown)[0]}'; valid: choices, low, high, log, int")
    if "choices" in d and (not isinstance(d["choices"], list) or not d["choices"]):
        raise XferError(f"{where}: {key}: choices must be a non-empty list")
    if "low" in d:
        try:
            low, high = float(d["low"]), float(d["high"])
        except (TypeError, ValueError):
            raise XferError(f"{where}: {key}: low and high must be numbers") from None
        if not low < high or (d.get("log") and low <= 0):
            raise XferError(f"{where}: {key}: need low < high (and low > 0 with log: true)")
    return dict(d)


def parse_space(raw: dict, cfg: DictConfig, name: str = "space", where: str = "search space",
                cached_views: int = 0) -> Space:
    """Check a space against params.yaml: every key must exist there, and be changeable on the current cache."""
    if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise XferError(f"{where}: needs a non-empty 'space:' mapping of params.yaml keys to choices or ranges")
    unknown = set(raw) - set(OPTIONS)
    if unknown:
        raise XferError(f"{where}: unknown setting '{sorted(unknown)[0]}'; valid: {', '.join(OPTIONS)}")
    params = {}
    for key, d in raw["space"].items():
        key = str(key)
        if OmegaConf.select(cfg, key, default="\0missing") == "\0missing":
            raise XferError(f"{where}: {key}: no such key in params.yaml; the space takes params.yaml keys such as "
                            "head.units, head.learning_rate, featurize.train_views")
        if key == CACHED_VIEWS_KEY:
            d = _check_point(where, key, d)
            values = d.get("choices") or list(range(int(d["low"]), int(d["high"]) + 1))
            too_many = [v for v in values if int(v) > cached_views]
            if too_many:
                raise XferError(f"{where}: {key}={too_many[0]}: only {cached_views} views are cached; rerun the "
                                f"views stage with more first (dvc exp run -S {key}={max(map(int, values))})")
        elif key == BOUNDARY_KEY:
            raise XferError(f"{where}: {key} needs new trunk views (the activations at the new boundary, a trunk "
                            f"stage run); queue DVC experiments for it instead: dvc exp run --queue -S {key}=A,B")
        elif key.startswith(NEEDS_FEATURES) or key == "seed":
            raise XferError(f"{where}: {key} needs new features (a search runs on the current cache); queue DVC "
                            f"experiments for it instead: dvc exp run --queue -S {key}=A,B")
        elif key.startswith(NEEDS_TRUNK_VIEWS):
            raise XferError(f"{where}: {key} needs new trunk views (they were made with this augmentation); queue "
                            f"DVC experiments for it instead: dvc exp run --queue -S {key}=A,B")
        elif not key.startswith(SEARCHABLE):
            raise XferError(f"{where}: {key} is not searched on cached features (only head.*, finetune.* and "
                            f"{CACHED_VIEWS_KEY}); queue DVC experiments for it: dvc exp run --queue -S {key}=A,B")
        elif key in ("head.epochs", "head.patience") and raw.get("max_epochs") is not None:
            raise XferError(f"{where}: {key}: set by max_epochs/patience of the space; drop one of them")
        elif key == "finetune.epochs" and raw.get("finetune_max_epochs") is not None:
            raise XferError(f"{where}: {key}: set by finetune_max_epochs of the space; drop one of them")
        params[key] = _check_point(where, key, d)
        values = params[key].get("choices") or [params[key]["low"], params[key]["high"]]
        if key == TRUNK_VIEWS_KEY and min(map(int, values)) < 1:
            raise XferError(f"{where}: {key}=0 fine-tunes on images every epoch (minutes per trial); a search "
                            "fine-tunes on trunk views: range over 1..K")
        if key == "finetune.enabled" and not all(isinstance(v, bool) for v in values):
            raise XferError(f"{where}: {key}: choices must be true/false")
    if any(k.startswith("finetune.") for k in params):
        if "finetune.enabled" not in params and not cfg.finetune.enabled:
            raise XferError(f"{where}: finetune.* keys but finetune.enabled is false in params.yaml and not in the "
                            "space: add finetune.enabled: {choices: [true, false]} (or pass finetune.enabled=true)")
        if cfg.finetune.enabled and int(cfg.finetune.trunk_views) < 1:
            raise XferError(f"{where}: params.yaml has finetune.trunk_views=0 (fine-tuning on images, minutes per "
                            "trial); a search fine-tunes on trunk views: pass finetune.trunk_views=2 (or more)")
    folds = int(raw.get("folds", 5))
    if folds < 2:
        raise XferError(f"{where}: folds: {folds}; cross-validation needs at least 2")
    opt = {k: (None if raw.get(k) is None else int(raw[k])) for k in ("max_epochs", "patience", "finetune_max_epochs")}
    return Space(name, params, folds, int(raw.get("trials", 30)), opt["max_epochs"], opt["patience"],
                 int(raw.get("startup_trials", 5)), float(raw.get("significance", 2.0)), where,
                 finetune_max_epochs=opt["finetune_max_epochs"])


def load_space(name: str, cfg: DictConfig, cached_views: int = 0, root: Path | None = None) -> Space:
    """Read and check ``conf/search/<name>.yaml``."""
    path = space_path(name, root)
    if not path.is_file():
        folder = path.parent
        valid = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise XferError(f"{path}: no such search space; valid in {folder}: {valid}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return parse_space(raw, cfg, path.stem, str(path), cached_views)


def trial_config(cfg: DictConfig, space: Space, point: dict[str, Any]) -> DictConfig:
    """params.yaml with the point applied, and head.epochs/patience (finetune.epochs) capped by the space."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in point.items():
        OmegaConf.update(c, key, value, merge=False)
    if space.max_epochs is not None:
        c.head.epochs = min(int(c.head.epochs), space.max_epochs)
    if space.patience is not None and c.head.patience is not None:
        c.head.patience = min(int(c.head.patience), space.patience)
    if space.finetune_max_epochs is not None:
        c.finetune.epochs = min(int(c.finetune.epochs), space.finetune_max_epochs)
    return c


def preset_values(cfg: DictConfig, space: Space, point: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml keys the winner's preset sets: the point, less its other finetune.* keys when it turns
    fine-tuning off (they would do nothing). The trials' epochs/patience caps made the comparison with the
    starting params cheaper for both alike; the final model trains with params.yaml's own."""
    if point.get("finetune.enabled") is False:
        return {k: v for k, v in point.items() if not k.startswith("finetune.") or k == "finetune.enabled"}
    return dict(point)


# --- the data the folds are cut from ---------------------------------------------------------------------------

def pool(x: np.ndarray, pooling: str, chunk: int = 512) -> np.ndarray:
    """Features as the head's first layer sees them: spatially averaged (gap) or flattened, float32, in memory."""
    out = []
    for i in range(0, len(x), chunk):
        part = np.asarray(x[i : i + chunk], dtype=np.float32)
        if part.ndim == 4:
            part = part.mean(axis=(1, 2)) if pooling == "gap" else part.reshape(len(part), -1)
        elif part.ndim == 3 and pooling == "gap":
            part = part.mean(axis=1)
        out.append(part.reshape(len(part), -1) if pooling != "gap" else part)
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@dataclass
class CVData:
    """Train + validation images' features (``x``, labels ``y``; the first ``n_train`` rows are the training
    images) and the cached augmented views of the training images (``views[v]`` aligned with ``x[:n_train]``)."""

    x: np.ndarray
    y: np.ndarray
    n_train: int
    views: np.ndarray  # (K, n_train, d)
    n_classes: int


def cv_data(x_train, y_train, x_views, x_val, y_val, pooling: str, n_classes: int) -> CVData:
    """Pooled CV data from the cache's arrays (``x_views``: the views stage's rows, view-major, or None)."""
    xt, xv = pool(x_train, pooling), pool(x_val, pooling)
    n = len(xt)
    views = pool(x_views, pooling).reshape(-1, n, xt.shape[1]) if x_views is not None and len(x_views) else \
        np.zeros((0, n, xt.shape[1]), np.float32)
    return CVData(np.concatenate([xt, xv]), np.concatenate([y_train, y_val]).astype(np.int64), n, views, n_classes)


def folds_of(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds (seeded): (train rows, held-out rows) of each."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y).min())
    if smallest < k:
        raise XferError(f"search: folds={k} but a class has only {smallest} train+val images; lower folds")
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def fold_rows(data: CVData, train_idx: np.ndarray, n_views: int) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training rows: its images' clean features, then ``n_views`` cached views of its training-split
    images (validation images have none)."""
    xs, ys = [data.x[train_idx]], [data.y[train_idx]]
    own = train_idx[train_idx < data.n_train]
    for v in range(n_views):
        xs.append(data.views[v][own])
        ys.append(data.y[own])
    return np.concatenate(xs), np.concatenate(ys)


class Pruned(Exception):
    """Raised by a ``report`` callback to stop a hopeless trial."""


def cv_scores(data: CVData, hcfg: DictConfig, folds: list, seed: int, n_views: int = 0, report=None,
              deterministic: bool = True, then=None) -> list[float]:
    """Held-out accuracy of each fold, the head trained by :func:`xfer.nets.models.fit_head` (early stopping on
    the held-out part, as train_head on the validation set). ``then(fold, head, train_idx, held_idx)``, if given,
    continues from the fold's head (fine-tuning, xfer.nets.tuning.FineTuning) and returns the fold's score
    instead. ``report(fold, mean_so_far)`` may raise to prune."""
    import tempfile

    import keras

    from xfer.core.runtime import seed_everything
    from xfer.nets.models import fit_head, new_head, restart

    keras.backend.clear_session()
    scores, model, start = [], None, None
    for i, (train_idx, held_idx) in enumerate(folds):
        seed_everything(seed + i, deterministic)
        x_tr, y_tr = fold_rows(data, train_idx, n_views)
        x_ho, y_ho = data.x[held_idx], data.y[held_idx]
        if model is None:  # one head per trial, compiled once: every fold restarts it from the same weights
            model = new_head(x_tr, data.n_classes, hcfg, steps_per_execution=STEPS_PER_EXECUTION)
            start = model.get_weights()
        restart(model, start, hcfg)
        with tempfile.TemporaryDirectory() as tmp:
            fit_head(x_tr, y_tr, x_ho, y_ho, hcfg, data.n_classes, Path(tmp) / "best.weights.h5", model=model)
        if then is not None:
            scores.append(then(i, model, train_idx, held_idx))
        else:
            probs = np.asarray(model(x_ho, training=False))
            pred = (probs[:, 0] > 0.5).astype(int) if probs.shape[1] == 1 else probs.argmax(axis=1)
            scores.append(float(np.mean(pred == y_ho)))
        if report is not None:
            report(i, float(np.mean(scores)))
    return scores


# --- naming, storage ---------------------------------------------------------------------------------

def cache_key(cfg: DictConfig, trunk: bool = False) -> str:
    """6 hex digits naming the feature cache a study runs on (data, split, backbone, featurize, seed; with
    ``trunk``, also the augmentation the trunk views are made with)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "split", "backbone", "featurize")}
    keep["seed"] = int(cfg.seed)
    if trunk:
        keep["augment"] = OmegaConf.to_container(cfg.finetune.augment, resolve=True)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:6]


def study_name(cfg: DictConfig, space: Space) -> str:
    return f"{cfg.data.name}-{cfg.backbone.name}-{space.name}-{cache_key(cfg, space.fine_tunes)}"


def default_storage(tracking: str) -> str:
    """The study's RDB beside the MLflow SQLite database (``mlruns/optuna.db``); a server needs ``--storage``."""
    if tracking.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking.removeprefix('sqlite:///')).with_name('optuna.db')}"
    raise XferError(f"MLFLOW_TRACKING_URI={tracking} is a server: give the study a shared database, e.g. --storage "
                    "postgresql://USER:PASSWORD@HOST:5432/optuna (or set XFER_SEARCH_STORAGE)")
