"""Augmented views, the one mechanism behind `featurize.train_views` (the head's features) and
`finetune.trunk_views` (activations at the fine-tuning boundary): K passes of every training image through
fine-tuning's augmentation layers (seeded) and a frozen model, streamed into a memory-mapped ``.npy`` (row
v * n + i is view v of image i); and the batches that train on them, one view per image per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer import XferError


def check_views(key: str, k) -> int:
    """A number of views: a whole number >= 0."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise XferError(f"{key}: {k!r} is not a whole number >= 0 (augmented views per training image)")
    return k


def cache_training_views(model, cfg: DictConfig, out: Path, k: int, dtype: str, record: bool = True) -> dict:
    """``k`` augmented views of every training image through ``model`` into ``out/train_*`` (features,
    labels, paths); logs images/s to the active MLflow run (``record``: a stage's); returns what meta.json
    records."""
    from xfer.core.runtime import set_jit, use_jit
    from xfer.data.paths import image_paths, read_manifest
    from xfer.nets.features import featurize_split
    from xfer.nets.models import augmentation
    from xfer.track.recorder import log_metric

    set_jit(model, use_jit(cfg.runtime.jit, cfg.runtime.deterministic))
    train = read_manifest("train")
    ips = featurize_split(model, image_paths(train), train["label"].to_numpy(), out, "train",
                          int(cfg.featurize.batch_size), dtype, augment=augmentation(cfg.finetune.augment,
                                                                                     int(cfg.seed)), views=k)
    if record:
        log_metric("images_per_sec", ips)
    return {"images": len(train), "shape": [int(d) for d in model.output_shape[1:]], "dtype": dtype}


def view_batches(x: np.ndarray, y: np.ndarray, views: int, batch_size: int, seed: int):
    """A Keras PyDataset over cached views: epoch e trains on view e mod ``views`` of every image, in a seeded
    shuffled order; rows are read from the (memory-mapped) array batch by batch, as float32."""
    import keras

    class ViewBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.n, self.epoch, self.rng = len(x) // views, 0, np.random.default_rng(seed)
            self.rows = self._order()

        def _order(self) -> np.ndarray:
            return (self.epoch % views) * self.n + self.rng.permutation(self.n)

        def __len__(self) -> int:
            return -(-self.n // batch_size)

        def __getitem__(self, i: int):
            rows = np.sort(self.rows[i * batch_size : (i + 1) * batch_size])  # sequential memmap reads
            return np.asarray(x[rows], dtype=np.float32), y[rows]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.rows = self._order()

    if views < 1 or len(x) % views or len(x) != len(y):
        raise XferError(f"cached views: {len(x)} rows, {len(y)} labels do not make {views} views per image")
    return ViewBatches()
