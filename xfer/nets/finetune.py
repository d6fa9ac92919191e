"""Fine-tuning the top of the backbone with the head: the image model (:func:`assemble`), the unfrozen top
(:func:`unfreeze_top`) and the fit (:func:`fit_finetune`: compile, callbacks, class weights, ``finetune.epochs``,
best weights back), the one training loop run by the finetune stage and by xfer search's fine-tuning trials
(xfer.nets.tuning). Keras is imported in the functions: the stage imports this module before TensorFlow is set up."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def assemble(cfg: DictConfig, head, seed: int):
    """Image model: augmentation -> preprocessing -> base (cache weights, inference mode) -> head."""
    import keras

    from xfer.nets.backbones import cached_base
    from xfer.nets.models import augmentation

    base, _ = cached_base(cfg.backbone)
    base.trainable = False
    size = int(cfg.backbone.image_size)
    inputs = keras.Input((size, size, 3), name="image")
    x = augmentation(cfg.finetune.augment, seed)(inputs)
    x = base(x, training=False)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{cfg.backbone.name}_classifier"), base


def unfreeze_top(base, boundary: str) -> int:
    """Make the backbone trainable from ``boundary`` on, BatchNorm excluded; return the unfrozen layer count."""
    from xfer.nets.backbones import backbone_cnn, unfreeze_from

    base.trainable = True  # recursive; unfreeze_from then re-freezes below the boundary and every BatchNorm
    return unfreeze_from(backbone_cnn(base), boundary)


def compile_finetune(model, f: DictConfig, n_classes: int, steps_per_epoch: int, jit: bool = False,
                     steps_per_execution: int = 1) -> None:
    """Compile with the fine-tuning section's optimizer (its schedule over ``steps_per_epoch``), loss and
    accuracy; after setting ``trainable``."""
    from xfer.nets.models import compile_model

    compile_model(model, f, n_classes, steps_per_epoch=steps_per_epoch, jit=jit,
                  steps_per_execution=max(1, min(int(steps_per_execution), int(steps_per_epoch))))


def fit_finetune(model, train, val, f: DictConfig, n_classes: int, checkpoint: Path, labels,
                 first_callbacks: list | tuple = (), extra: list | tuple = ()):
    """Fit a compiled fine-tuning model (:func:`compile_finetune`) for ``finetune.epochs`` on ``train`` (a
    dataset that shuffles itself: images, or trunk views one per image per epoch), validating on ``val`` (or by
    ``first_callbacks`` writing val_* into the logs), with the section's callbacks (best-val_loss checkpoint,
    early stopping, reduce-LR) and class weights from ``labels`` (one per training image); load the best epoch's
    weights (whether or not early stopping fired) and return the Keras history."""
    from xfer.nets.models import class_weights, training_callbacks

    callbacks = training_callbacks(checkpoint, f, list(extra))
    history = model.fit(train, validation_data=val, epochs=int(f.epochs), callbacks=[*first_callbacks, *callbacks],
                        shuffle=False, verbose=0, class_weight=class_weights(labels, f.class_weight, n_classes))
    if Path(checkpoint).exists():
        model.load_weights(str(checkpoint))
    return history
