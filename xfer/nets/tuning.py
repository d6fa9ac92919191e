"""xfer search's fine-tuning trials: the activations at ``backbone.unfreeze_from`` they train and validate on
(computed once per search, in memory), and one fold's fine-tuning through the finetune stage's own fit
(xfer.nets.finetune.fit_finetune) after the fold's head (xfer.nets.search.cv_scores).

A fold's fine-tuning starts from the head the trial just trained on that fold and from the top of the base as
featurize cached it, and trains the top and the head, as the finetune stage does on trunk views: epoch e on view
e mod K of each of the fold's training-split images (the trunk stage's cached views, or the same views made once by
the search when the trunk cache has none), plus the plain activations of the fold's validation-split images (they
have no augmented views). It early-stops on, and is scored by, the held-out images' plain activations: what the
image model computes on them (augmentation is off at inference). The test split is never read.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer import XferError


@dataclass
class Boundary:
    """Plain activations of the train then val images (``acts``: rows as xfer.nets.search.CVData.x, float32),
    K trunk views of the train images (``views``: row v * n_train + i is view v of image i, float16), the top of
    the base (``top``: activations -> features, sharing the base's layers) with its cached weights (``start``),
    and the base's precision policy."""

    acts: np.ndarray
    views: np.ndarray
    n_train: int
    top: object
    start: list
    policy: str
    source: str  # "trunk cache" | "made by the search"

    @property
    def k(self) -> int:
        return len(self.views) // max(self.n_train, 1)


@contextmanager
def precision(policy: str):
    """Keras's global dtype policy set to ``policy`` inside the block only."""
    import keras

    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def cached_trunk_views(cfg: DictConfig, k: int, n_train: int) -> np.ndarray | None:
    """The first ``k`` views of the trunk stage's cache (memory-mapped) if it holds at least ``k`` at this
    boundary for these images, else None."""
    from xfer.core.files import read_json
    from xfer.data.paths import trunk_dir

    d = trunk_dir(cfg.backbone.name)
    meta = read_json(d / "meta.json") if (d / "meta.json").is_file() else {}
    if meta.get("boundary") != cfg.backbone.unfreeze_from or int(meta.get("views") or 0) < k or \
            int(meta.get("images") or 0) != n_train:
        return None
    return np.load(d / "train_features.npy", mmap_mode="r", allow_pickle=False)[: k * n_train]


def boundary_data(cfg: DictConfig, k: int) -> Boundary:
    """Cut featurize's base at ``backbone.unfreeze_from``; run the trunk once over the train and val images (no
    augmentation) and take ``k`` trunk views (the trunk stage's, else made here the same way, seeded, in a
    temporary folder that is deleted)."""
    import keras

    from xfer.core.runtime import seed_everything
    from xfer.data.images import image_dataset
    from xfer.data.paths import image_paths, read_manifest
    from xfer.nets.backbones import cached_base
    from xfer.nets.boundary import activations, split_base
    from xfer.nets.finetune import unfreeze_top
    from xfer.nets.views import cache_training_views

    boundary = cfg.backbone.unfreeze_from
    with precision(keras.mixed_precision.global_policy().name):  # cached_base sets featurize's: restored after
        base, _ = cached_base(cfg.backbone)
        policy = keras.mixed_precision.global_policy().name
        unfreeze_top(base, boundary)  # checks the layer name
        parts = split_base(base, boundary)
        if parts is None:
            raise XferError(f"backbone.unfreeze_from={boundary}: a connection bypasses it, so fine-tuning trains on "
                            "images (minutes per trial), not searched; queue DVC experiments for it instead: dvc exp "
                            "run --queue -S finetune.enabled=true")
        trunk, top = parts
        size, bs = int(cfg.backbone.image_size), int(cfg.featurize.batch_size)
        acts = []
        for split in ("train", "val"):
            m = read_manifest(split)
            x, _ = activations(trunk, image_dataset(image_paths(m), m["label"].to_numpy(), size, bs))
            acts.append(np.asarray(x, dtype=np.float32))
        n_train = len(acts[0])
        views, source = cached_trunk_views(cfg, k, n_train), "trunk cache"
        if views is None:
            source = "made by the search"
            with tempfile.TemporaryDirectory(prefix="xfer-search-trunk-") as tmp:
                seed_everything(int(cfg.seed), bool(cfg.runtime.deterministic))  # as the trunk stage
                cache_training_views(trunk, cfg, Path(tmp), k, "float16", record=False)
                views = np.array(np.load(Path(tmp) / "train_features.npy", allow_pickle=False))
    return Boundary(np.concatenate(acts), views, n_train, top, top.get_weights(), policy, source)


def fold_views(bd: Boundary, y: np.ndarray, train_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """A fold's fine-tuning rows at the boundary, view-major as :func:`xfer.nets.views.view_batches` reads them:
    per view v, view v of its training-split images then the plain activations of its validation-split images.
    Returns the rows, their labels, and the labels of its images (one each, for class weights)."""
    own, other = train_idx[train_idx < bd.n_train], train_idx[train_idx >= bd.n_train]
    m = len(own) + len(other)
    x = np.empty((k * m, *bd.acts.shape[1:]), np.float16)
    for v in range(k):
        x[v * m : v * m + len(own)] = bd.views[v * bd.n_train + own]
        x[v * m + len(own) : (v + 1) * m] = bd.acts[other]
    labels = np.concatenate([y[own], y[other]])
    return x, np.tile(labels, k), labels


class FineTuning:
    """One trial's fine-tuning, fold after fold (``__call__`` is xfer.nets.search.cv_scores's ``then``): the
    model (top -> a head shaped as the trial's) is built and compiled once, and each fold restarts it from the
    cached top weights and the head that fold just trained, fits it with :func:`xfer.nets.finetune.fit_finetune`
    and returns the held-out accuracy."""

    def __init__(self, bd: Boundary, cfg: DictConfig, n_classes: int, y: np.ndarray, steps_per_execution: int = 1):
        self.bd, self.cfg, self.n_classes, self.y, self.spe = bd, cfg, n_classes, y, steps_per_execution
        self.model = self.head = None
        self.k = int(cfg.finetune.trunk_views)
        if len(bd.acts) != len(y):
            raise XferError(f"search: {len(bd.acts)} train+val images in data/splits but {len(y)} cached feature rows; "
                            "rerun the featurize stage (dvc repro featurize)")
        if not 1 <= self.k <= bd.k:
            raise XferError(f"finetune.trunk_views={self.k}: the search fine-tunes on 1..{bd.k} trunk views")

    def __call__(self, fold: int, head, train_idx: np.ndarray, held_idx: np.ndarray) -> float:
        from xfer.nets.boundary import top_and_head
        from xfer.nets.finetune import compile_finetune, fit_finetune
        from xfer.nets.models import build_head, restart
        from xfer.nets.views import view_batches

        f, bd = self.cfg.finetune, self.bd
        bs = int(f.batch_size)
        x_tr, y_tr, labels = fold_views(bd, self.y, train_idx, self.k)
        x_ho, y_ho = bd.acts[held_idx], self.y[held_idx]
        if self.model is None:
            self.head = build_head(tuple(bd.top.output_shape[1:]), self.n_classes, self.cfg.head)  # float32
            with precision(bd.policy):  # the stage builds its fine-tuning model under the base's policy
                self.model = top_and_head(bd.top, self.head)
            compile_finetune(self.model, f, self.n_classes, -(-len(labels) // bs), steps_per_execution=self.spe)
        bd.top.set_weights(bd.start)
        self.head.set_weights(head.get_weights())  # the same layers and weights, on feature maps
        restart(self.model, None, f)
        with tempfile.TemporaryDirectory() as tmp:
            fit_finetune(self.model, view_batches(x_tr, y_tr, self.k, bs, int(self.cfg.seed) + fold), (x_ho, y_ho), f,
                         self.n_classes, Path(tmp) / "best.weights.h5", labels)
        probs = np.asarray(self.model.predict(x_ho, batch_size=bs, verbose=0))
        pred = (probs[:, 0] > 0.5).astype(int) if probs.shape[1] == 1 else probs.argmax(axis=1)
        return float(np.mean(pred == y_ho))
