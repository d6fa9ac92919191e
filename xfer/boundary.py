"""The fine-tuning boundary as a cut: the frozen trunk below ``backbone.unfreeze_from`` runs once per image, the
trainable top every epoch. Fine-tuning validates through the top only, on activations computed once."""

from __future__ import annotations

import keras
import numpy as np

from xfer.backbones import backbone_cnn


def split_base(base: keras.Model, boundary: str) -> tuple[keras.Model, keras.Model] | None:
    """``(trunk, top)`` for a model made by :func:`xfer.backbones.build_base`: ``trunk`` maps images to the
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
        xs.append(np.asarray(trunk.predict_on_batch(images)))
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


def boundary_validation(base: keras.Model, head: keras.Model, boundary: str, dataset, batch_size: int,
                        compile_like) -> BoundaryValidation | None:
    """A :class:`BoundaryValidation` for the model ``base`` -> ``head`` (None where the boundary cannot be cut);
    ``compile_like(model)`` compiles the validation model with the training model's loss and metrics."""
    parts = split_base(base, boundary)
    if parts is None:
        return None
    trunk, top = parts
    x, y = activations(trunk, dataset)
    acts = keras.Input(x.shape[1:], name="activations")
    val_model = keras.Model(acts, head(top(acts, training=False), training=False), name="validation")
    compile_like(val_model)
    return BoundaryValidation(val_model, x, y, batch_size)
