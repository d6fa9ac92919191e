"""The fine-tuning boundary as a cut: the frozen trunk below ``backbone.unfreeze_from`` runs once per image, the
trainable top every epoch. Fine-tuning validates through the top only, on activations computed once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.distribute import predict_on_batch
from xfer.nets.backbones import backbone_cnn
from xfer.nets.views import view_batches


def split_base(base: keras.Model, boundary: str) -> tuple[keras.Model, keras.Model] | None:
    """``(trunk, top)`` for a model made by :func:`xfer.nets.backbones.build_base`: ``trunk`` maps images to the
    activations entering layer ``boundary`` and ``top`` maps those to the base's output, sharing the base's layers
    (and so its weights, trained or not). None where a connection bypasses the boundary (e.g. inside a residual
    block), so that no single tensor carries everything the top needs."""
    cnn = backbone_cnn(base)
    cut = cnn.get_layer(boundary).input
    if not isinstance(cut, keras.KerasTensor):  # a merge layer (Add, Concatenate): several tensors enter it
        return None
    try:
        top_cnn = keras.Model(cut, cnn.output, name=f"{cnn.name}_top")
    except ValueError:  # "not connected to inputs": a path from below the boundary skips it
        return None
    trunk_cnn = keras.Model(cnn.input, cut, name=f"{cnn.name}_trunk")
    at = base.layers.index(cnn)
    images = keras.Input(base.input_shape[1:], name="image")
    x = images
    for layer in base.layers[1:at]:  # preprocessing
        x = layer(x)
    trunk = keras.Model(images, trunk_cnn(x, training=False), name="trunk")
    acts = keras.Input(tuple(cut.shape[1:]), name="activations")
    x = top_cnn(acts, training=False)
    for layer in base.layers[at + 1 :]:  # pooling, float32 output
        x = layer(x)
    return trunk, keras.Model(acts, x, name="top")


def activations(trunk: keras.Model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """The trunk's output and the labels for every batch of an ``(images, labels)`` dataset, in order."""
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(np.asarray(predict_on_batch(trunk, images)))
        ys.append(np.asarray(labels))
    return np.concatenate(xs), np.concatenate(ys)


class BoundaryValidation(keras.callbacks.Callback):
    """Validation at each epoch's end through ``top`` -> ``head`` on cached boundary activations; writes
    ``val_loss`` and ``val_<metric>`` into the epoch's logs for the callbacks after it (checkpoint, early
    stopping, curves). Equal to validating the whole model on the images, at a fraction of the cost."""

    def __init__(self, val_model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int):
        super().__init__()
        self.val_model, self.x, self.y, self.batch_size = val_model, x, y, batch_size

    def evaluate(self) -> dict[str, float]:
        result = self.val_model.evaluate(self.x, self.y, batch_size=self.batch_size, verbose=0, return_dict=True)
        return {f"val_{k}": float(v) for k, v in result.items()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs.update(self.evaluate())


class Plan(NamedTuple):
    """What fine-tuning's ``fit`` runs: the model it trains (to compile with ``steps`` per epoch), its training and
    validation data, the callbacks that must run before the others, the final validation metrics, and how the
    training rows were made."""

    model: keras.Model
    train: Any
    val: Any
    first_callbacks: list
    evaluate: Callable[[], dict]
    source: str  # images | trunk views
    at_boundary: bool  # validation through the top only
    steps: int  # batches per epoch


def top_and_head(top: keras.Model, head: keras.Model, name: str = "top_and_head") -> keras.Model:
    """Boundary activations -> the top of the base (inference-mode BatchNorm) -> the head: what fine-tuning on
    trunk views trains, sharing the layers (and weights) of ``top`` and ``head``."""
    acts = keras.Input(top.input_shape[1:], name="activations")
    return keras.Model(acts, head(top(acts, training=False)), name=name)


def fit_plan(cfg: DictConfig, model: keras.Model, base: keras.Model, head: keras.Model,
             compile_like: Callable[[keras.Model, int], None]) -> Plan:
    """Train ``model`` (augmentation -> base -> head) on images, or with ``finetune.trunk_views`` the top and
    head on the trunk stage's cached boundary views; validate through the top on activations computed once
    (on images where the boundary cannot be cut). The plan's model is compiled by the caller
    (xfer.nets.finetune.compile_finetune, after setting ``trainable``); ``compile_like(m, steps_per_epoch)``
    compiles the validation model the same way."""
    from xfer.data.images import image_dataset
    from xfer.data.paths import image_paths, read_manifest

    f, boundary = cfg.finetune, cfg.backbone.unfreeze_from
    size, bs, seed = int(cfg.backbone.image_size), int(f.batch_size), int(cfg.seed)
    val = read_manifest("val")
    ds_val = image_dataset(image_paths(val), val["label"].to_numpy(), size, bs)
    parts = split_base(base, boundary)
    if f.get("trunk_views") and parts is not None:  # else the trunk stage cached nothing: train on images
        x, y = load_trunk_views(cfg)
        trunk, top = parts
        top_model = top_and_head(top, head)
        val_data = activations(trunk, ds_val)
        return Plan(top_model, view_batches(x, y, int(f.trunk_views), bs, seed), val_data, [],
                    lambda: {f"val_{k}": v for k, v in top_model.evaluate(*val_data, batch_size=bs, verbose=0,
                                                                          return_dict=True).items()},
                    "trunk views", True, -(-len(y) // int(f.trunk_views) // bs))
    train = read_manifest("train")
    steps = -(-len(train) // bs)
    ds_train = image_dataset(image_paths(train), train["label"].to_numpy(), size, bs, shuffle_seed=seed)
    if parts is None:
        return Plan(model, ds_train, ds_val, [], lambda: model.evaluate(ds_val, verbose=0, return_dict=True),
                    "images", False, steps)
    val_model = top_and_head(parts[1], head, "validation")
    compile_like(val_model, 1)
    check = BoundaryValidation(val_model, *activations(parts[0], ds_val), bs)
    return Plan(model, ds_train, None, [check], check.evaluate, "images", True, steps)


def load_trunk_views(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The trunk stage's cached views (memory-mapped) and labels, checked against the params."""
    from xfer.core.files import read_json
    from xfer.data.paths import trunk_dir

    d = trunk_dir(cfg.backbone.name)
    meta = read_json(d / "meta.json") if (d / "meta.json").is_file() else {}
    want = {"boundary": cfg.backbone.unfreeze_from, "views": int(cfg.finetune.trunk_views)}
    if {k: meta.get(k) for k in want} != want:
        raise XferError(f"{d}: no cached trunk views for {want}; run the trunk stage (dvc repro trunk)")
    return np.load(d / "train_features.npy", mmap_mode="r"), np.load(d / "train_labels.npy")
