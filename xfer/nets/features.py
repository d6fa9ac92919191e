"""Writing cached features: the images of one split through a frozen model, streamed batch by batch into a
memory-mapped .npy (memory does not grow with the number of images), optionally as K augmented views."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xfer.core.distribute import predict_on_batch
from xfer.core.signals import raise_if_interrupted

BASE_WEIGHTS = "base.weights.h5"
DTYPES = {"float32": np.float32, "float16": np.float16}


def featurize_split(base, paths: list[str], labels: np.ndarray, out: Path, split: str, batch_size: int,
                    dtype: str = "float32", augment=None, views: int = 1) -> float:
    """Stream the features of one split into ``out/<split>_features.npy`` (rows in manifest order; with
    ``augment``, a Keras layer applied in training mode to each batch, ``views`` passes: row v * n + i is view v
    of image i); labels and paths follow the rows. Return images per second."""
    from xfer.data.images import image_dataset

    n, size = len(paths), int(base.input_shape[1])
    shape = (n * views, *base.output_shape[1:])
    feats = np.lib.format.open_memmap(out / f"{split}_features.npy", mode="w+", dtype=DTYPES[dtype], shape=shape)
    ds = image_dataset(paths, labels, size, batch_size)
    start, row = time.perf_counter(), 0
    with tqdm(total=n * views, desc=f"featurize {split}", unit="img", file=sys.stderr, mininterval=2.0) as bar:
        for _ in range(views):
            for images, _ in ds:
                if augment is not None:
                    images = augment(images, training=True)
                batch = predict_on_batch(base, images)
                feats[row : row + len(batch)] = batch
                row += len(batch)
                bar.update(len(batch))
                raise_if_interrupted()  # a signal deferred while TensorFlow ran
    feats.flush()
    del feats
    np.save(out / f"{split}_labels.npy", np.tile(labels.astype(np.int64), views), allow_pickle=False)
    (out / f"{split}_paths.txt").write_text("".join(f"{p}\n" for p in paths) * views, encoding="utf-8")
    return n * views / max(time.perf_counter() - start, 1e-9)
