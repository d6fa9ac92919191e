"""Keras models: the dense head and its fit (train_head's, also run by xfer search), optimizers, augmentation,
training callbacks, byte-reproducible saving."""

from __future__ import annotations

from pathlib import Path

import keras
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.files import atomic_path, make_keras_file_deterministic


def save_model(model: keras.Model, target: str | Path) -> None:
    """Save a ``.keras`` file atomically and byte-reproducibly (same weights -> same bytes)."""
    if getattr(model, "optimizer", None) is not None and not model.optimizer.built:  # compiled, never trained:
        model.optimizer.build(model.trainable_variables)  # else loading warns of mismatched optimizer variables
    with atomic_path(target) as tmp:
        model.save(str(tmp))
        make_keras_file_deterministic(tmp)


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


@keras.saving.register_keras_serializable(package="xfer")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing on integer labels (Keras's sparse loss has no smoothing)."""

    def __init__(self, n_classes: int, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.n_classes, self.label_smoothing = int(n_classes), float(label_smoothing)
        self._cce = keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing)

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return self._cce(keras.ops.one_hot(labels, self.n_classes), y_pred)

    def get_config(self) -> dict:
        return {**super().get_config(), "n_classes": self.n_classes, "label_smoothing": self.label_smoothing}


def loss_for(n_classes: int, label_smoothing: float = 0.0):
    """Binary (sigmoid) or sparse categorical (softmax) cross-entropy, with optional label smoothing."""
    if n_classes == 2:
        return keras.losses.BinaryCrossentropy(label_smoothing=float(label_smoothing))
    if label_smoothing:
        return SparseSmoothedCrossentropy(n_classes, label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def learning_rate(ocfg: DictConfig, steps_per_epoch: int | None = None):
    """``schedule: constant`` (``learning_rate``) or ``cosine``: linear warm-up from 0 over ``warmup_epochs``,
    then cosine decay to 0 by the last of ``epochs`` (needs the steps per epoch)."""
    lr, schedule = float(ocfg.learning_rate), ocfg.get("schedule") or "constant"
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise XferError(f"schedule: '{schedule}' is not one of constant, cosine")
    if not steps_per_epoch:
        raise XferError("schedule: cosine needs a known number of steps per epoch")
    warmup = int(ocfg.get("warmup_epochs") or 0) * steps_per_epoch
    total = max(int(ocfg.epochs) * steps_per_epoch - warmup, 1)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(0.0, total, warmup_target=lr, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(lr, total)


def optimizer(ocfg: DictConfig, steps_per_epoch: int | None = None) -> keras.optimizers.Optimizer:
    """rmsprop | adam | sgd (with momentum) at ``learning_rate`` (constant or a warm-up + cosine schedule)."""
    lr = learning_rate(ocfg, steps_per_epoch)
    if ocfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    if ocfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if ocfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=float(ocfg.momentum))
    raise XferError(f"optimizer: '{ocfg.optimizer}' is not one of rmsprop, adam, sgd")


def compile_model(model: keras.Model, ocfg: DictConfig, n_classes: int, steps_per_epoch: int | None = None,
                  jit: bool = False, steps_per_execution: int = 1) -> None:
    """Compile with the section's optimizer, loss (label smoothing) and accuracy; ``jit``: XLA (runtime.jit);
    ``steps_per_execution``: batches per call of the compiled step (the same updates, less Python per batch)."""
    from xfer.core.runtime import set_jit

    model.compile(optimizer=optimizer(ocfg, steps_per_epoch),
                  loss=loss_for(n_classes, ocfg.get("label_smoothing") or 0.0), metrics=["accuracy"],
                  steps_per_execution=int(steps_per_execution))
    set_jit(model, jit)


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


def training_callbacks(checkpoint: Path, ocfg: DictConfig, extra: list | None = None) -> list:
    """Best-val_loss weights checkpoint (a ``.weights.h5`` path), early stopping restoring the best weights
    (``patience``; null disables) and reduce-LR-on-plateau (``reduce_lr_patience``, ``reduce_lr_factor``,
    ``min_lr``; null patience disables; not with a cosine schedule, which sets the rate itself)."""
    callbacks = [keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True,
                                                 save_weights_only=True)]
    if ocfg.patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(ocfg.patience),
                                                       restore_best_weights=True))
    if ocfg.reduce_lr_patience is not None and (ocfg.get("schedule") or "constant") == "constant":
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


def fit_head(x_train, y_train, x_val, y_val, hcfg: DictConfig, n_classes: int, checkpoint: Path,
             extra: list | None = None, jit: bool = False, before_compile=None, steps_per_execution: int = 1,
             model: keras.Model | None = None):
    """Build, compile and fit the head on features exactly as the train_head stage does (the section's optimizer,
    loss, callbacks, class weights, ``epochs``, shuffled batches); return the model with the weights of its lowest
    ``val_loss`` epoch and the Keras history. ``checkpoint``: a ``.weights.h5`` path for the best weights;
    ``steps_per_execution`` > 1 (train_head: a whole epoch; xfer search) runs that many batches per call, the same
    updates (per-batch callbacks see one call; at most an epoch per call);
    ``model``: a head from :func:`new_head`, fitted as it is (after :func:`restart`, the k folds of one trial
    share their compiled steps instead of tracing them again)."""
    if model is None:
        model = new_head(x_train, n_classes, hcfg, jit, before_compile, steps_per_execution)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=int(hcfg.epochs),
                        batch_size=int(hcfg.batch_size), callbacks=training_callbacks(checkpoint, hcfg, extra),
                        shuffle=True, verbose=0, class_weight=class_weights(y_train, hcfg.class_weight, n_classes))
    if Path(checkpoint).exists():  # the best epoch, whether or not early stopping fired (else: no finite val_loss)
        model.load_weights(str(checkpoint))
    return model, history


def new_head(x_train, n_classes: int, hcfg: DictConfig, jit: bool = False, before_compile=None,
             steps_per_execution: int = 1) -> keras.Model:
    """The head built for these training rows and compiled (schedules count the steps of ``len(x_train)`` rows)."""
    model = build_head(tuple(x_train.shape[1:]), n_classes, hcfg)
    if before_compile is not None:
        before_compile()  # e.g. check_loss_scaling: after building, before compiling
    steps = -(-len(x_train) // int(hcfg.batch_size))
    compile_model(model, hcfg, n_classes, steps_per_epoch=steps, jit=jit,
                  steps_per_execution=min(int(steps_per_execution), steps))
    return model


def restart(model: keras.Model, weights: list | None, hcfg: DictConfig) -> None:
    """Put a compiled model back to a fresh start: the given initial weights (None: keep those set), zeroed
    optimizer state (step count, moments) and the section's learning rate (reduce-LR-on-plateau may have lowered
    it)."""
    if weights is not None:
        model.set_weights(weights)
    opt = model.optimizer
    if opt.built:
        for v in opt.variables:
            if v is not getattr(opt, "_learning_rate", None):
                v.assign(keras.ops.zeros_like(v))
    if isinstance(opt.learning_rate, keras.Variable) or hasattr(opt.learning_rate, "assign"):
        if (hcfg.get("schedule") or "constant") == "constant":
            opt.learning_rate.assign(float(hcfg.learning_rate))
