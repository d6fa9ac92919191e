"""Keras models: the frozen backbone (with its own preprocessing), the dense head, the fine-tuning model."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import keras
from omegaconf import DictConfig

from xfer import XferError
from xfer.files import atomic_path, make_keras_file_deterministic


@keras.saving.register_keras_serializable(package="xfer")
class Preprocess(keras.layers.Layer):
    """The backbone's own ``preprocess_input`` as a saveable layer (inputs: RGB floats in [0, 255])."""

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        self.module = module
        self._fn = importlib.import_module(f"keras.applications.{module}").preprocess_input

    def call(self, x):
        return self._fn(x)

    def get_config(self) -> dict:
        return {**super().get_config(), "module": self.module}


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def set_precision(precision: str) -> None:
    """Keras mixed precision: ``float32`` (default) | ``bfloat16`` | ``float16`` compute."""
    if precision not in PRECISIONS:
        raise XferError(f"runtime.precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])


def build_base(bcfg: DictConfig, weights_file: str | Path | None = None, pooling: str | None = None) -> keras.Model:
    """The backbone without its top: images in [0, 255] -> feature maps (or vectors with ``pooling`` avg/max),
    preprocessing included.

    ``weights_file`` (a ``.weights.h5`` saved by featurize) takes precedence over ``bcfg.weights``.
    """
    try:
        ctor = getattr(keras.applications, bcfg.constructor)
    except AttributeError:
        raise XferError(f"backbone.constructor: keras.applications has no '{bcfg.constructor}'") from None
    weights = bcfg.weights if weights_file is None else None
    file_weights = weights_file
    if weights not in (None, "imagenet"):
        file_weights, weights = Path(weights), None
        if not file_weights.is_file():
            raise XferError(f"backbone.weights: file {file_weights} not found; use imagenet, null or a "
                            ".weights.h5 path")
    size = int(bcfg.image_size)
    try:
        cnn = ctor(include_top=False, weights=weights, input_shape=(size, size, 3))
    except Exception as exc:  # Keras raises a plain Exception for a failed weights download
        url = re.search(r"https?://\S+?\.h5", str(exc))
        if weights != "imagenet" or not url:
            raise
        name = url.group(0).rsplit("/", 1)[-1]
        raise XferError(f"backbone.weights=imagenet: could not download {name} (offline?); copy it from "
                        f"{url.group(0)} into ~/.keras/models/, or pass backbone.weights=/path/to/file.weights.h5"
                        ) from None
    if bcfg.feature_layer:
        try:
            out = cnn.get_layer(bcfg.feature_layer).output
        except ValueError:
            raise XferError(f"backbone.feature_layer: {bcfg.constructor} has no layer '{bcfg.feature_layer}'") \
                from None
        cnn = keras.Model(cnn.input, out, name=cnn.name)
    if file_weights is not None:
        try:
            cnn.load_weights(str(file_weights))
        except Exception as exc:
            raise XferError(f"backbone weights {file_weights} do not fit {bcfg.constructor}: "
                            f"{' '.join(str(exc).split())[:160]}") from None
    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess(bcfg.module, name="preprocess")(inputs)
    x = cnn(x, training=False)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    elif pooling is not None:
        raise XferError(f"featurize.pooling: '{pooling}' is not one of null, avg, max")
    outputs = keras.layers.Activation("linear", dtype="float32", name="features")(x)  # float32 out, any policy
    return keras.Model(inputs, outputs, name=f"base_{bcfg.name}")


def save_model(model: keras.Model, target: str | Path) -> None:
    """Save a ``.keras`` file atomically and byte-reproducibly (same weights -> same bytes)."""
    with atomic_path(target) as tmp:
        model.save(str(tmp))
        make_keras_file_deterministic(tmp)


def backbone_cnn(base: keras.Model) -> keras.Model:
    """The Keras Applications network inside a model made by :func:`build_base`."""
    return next(layer for layer in base.layers if isinstance(layer, keras.Model))


def build_head(feature_shape: tuple[int, ...], n_classes: int, hcfg: DictConfig) -> keras.Model:
    """Flatten or global pooling -> Dense -> Dropout -> sigmoid (2 classes) / softmax (more)."""
    reg = keras.regularizers.L2(hcfg.l2) if hcfg.l2 else None
    inputs = keras.Input(feature_shape, name="features")
    if hcfg.pooling == "flatten":
        x = keras.layers.Flatten()(inputs) if len(feature_shape) > 1 else inputs
    elif hcfg.pooling == "gap":
        x = keras.layers.GlobalAveragePooling2D()(inputs) if len(feature_shape) == 3 else inputs
    else:
        raise XferError(f"head.pooling: '{hcfg.pooling}' is not one of flatten, gap")
    x = keras.layers.Dense(hcfg.units, activation=hcfg.activation, kernel_regularizer=reg)(x)
    x = keras.layers.Dropout(hcfg.dropout)(x)
    if n_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="prob")(x)
    else:
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="prob")(x)
    return keras.Model(inputs, outputs, name="head")


def loss_for(n_classes: int) -> str:
    return "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"


def optimizer(ocfg: DictConfig) -> keras.optimizers.Optimizer:
    """rmsprop | adam | sgd (with momentum) at ``learning_rate``."""
    lr = float(ocfg.learning_rate)
    if ocfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    if ocfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if ocfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=float(ocfg.momentum))
    raise XferError(f"optimizer: '{ocfg.optimizer}' is not one of rmsprop, adam, sgd")


def compile_model(model: keras.Model, ocfg: DictConfig, n_classes: int) -> None:
    model.compile(optimizer=optimizer(ocfg), loss=loss_for(n_classes), metrics=["accuracy"])


def augmentation(acfg: DictConfig, seed: int) -> keras.Sequential:
    """Random flip / rotation / zoom (and optional contrast, brightness, translation); active only in training."""
    layers = []
    if acfg.flip:
        layers.append(keras.layers.RandomFlip(acfg.flip, seed=seed))
    if acfg.rotation:
        layers.append(keras.layers.RandomRotation(acfg.rotation, seed=seed))
    if acfg.zoom:
        layers.append(keras.layers.RandomZoom(acfg.zoom, seed=seed))
    if acfg.get("translation"):
        layers.append(keras.layers.RandomTranslation(acfg.translation, acfg.translation, seed=seed))
    if acfg.get("contrast"):
        layers.append(keras.layers.RandomContrast(acfg.contrast, value_range=(0, 255), seed=seed))
    if acfg.get("brightness"):
        layers.append(keras.layers.RandomBrightness(acfg.brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augment")


def unfreeze_from(cnn: keras.Model, layer_name: str) -> int:
    """Make ``layer_name`` and every later layer trainable, except BatchNormalization; return the count."""
    names = [layer.name for layer in cnn.layers]
    if layer_name not in names:
        raise XferError(f"backbone.unfreeze_from: {cnn.name} has no layer '{layer_name}'")
    cnn.trainable = True
    start = names.index(layer_name)
    count = 0
    for i, layer in enumerate(cnn.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        count += bool(layer.trainable and layer.weights)
    return count


def training_callbacks(checkpoint: Path, ocfg: DictConfig, extra: list | None = None) -> list:
    """Best-val_loss weights checkpoint (a ``.weights.h5`` path), early stopping restoring the best weights
    (``patience``; null disables) and reduce-LR-on-plateau (``reduce_lr_patience``, ``reduce_lr_factor``,
    ``min_lr``; null patience disables)."""
    callbacks = [keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True,
                                                 save_weights_only=True)]
    if ocfg.patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(ocfg.patience),
                                                       restore_best_weights=True))
    if ocfg.reduce_lr_patience is not None:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=float(ocfg.reduce_lr_factor),
                                                           patience=int(ocfg.reduce_lr_patience),
                                                           min_lr=float(ocfg.min_lr)))
    return callbacks + list(extra or [])


def class_weights(labels, setting: str | None, n_classes: int) -> dict[int, float] | None:
    """``null`` (none) or ``balanced`` (inverse class frequency, scikit-learn's formula)."""
    if setting is None:
        return None
    if setting != "balanced":
        raise XferError(f"class_weight: '{setting}' is not one of null, balanced")
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(labels))
    return {i: float(w) for i, w in enumerate(weights)}
