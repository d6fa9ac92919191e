"""Convnets trained from scratch on the images (Chollet ch. 8 and 9): the baselines transfer learning is measured
against. ``convnet``: Conv 32/64/128/256/256 with max pooling, Flatten, optional Dropout, Dense. ``xception_mini``:
a 5x5 stem, then per width a residual block of BatchNorm-ReLU-SeparableConv2D twice and max pooling, added to a
strided 1x1 projection of its input; global average pooling, Dropout, Dense. Both take images in [0, 255]
(optional augmentation, then rescaling to [0, 1]) and end in a float32 sigmoid (2 classes) or softmax."""

from __future__ import annotations

import keras
from keras import layers
from omegaconf import DictConfig

from xfer import XferError
from xfer.nets.models import augmentation

MODELS = ("convnet", "xception_mini")


def _convnet(x, filters: list[int]):
    for i, width in enumerate(filters):
        x = layers.Conv2D(width, 3, activation="relu", name=f"conv{i + 1}")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    return layers.Flatten(name="flatten")(x)


def _xception_mini(x, filters: list[int], bn_momentum: float):
    x = layers.Conv2D(filters[0], 5, use_bias=False, name="stem")(x)
    for i, width in enumerate(filters):
        residual = x
        for j in (1, 2):
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"block{i + 1}_bn{j}")(x)
            x = layers.Activation("relu", name=f"block{i + 1}_relu{j}")(x)
            x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False, name=f"block{i + 1}_sepconv{j}")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"block{i + 1}_pool")(x)
        residual = layers.Conv2D(width, 1, strides=2, padding="same", use_bias=False,
                                 name=f"block{i + 1}_project")(residual)
        x = layers.Add(name=f"block{i + 1}_add")([x, residual])
    return layers.GlobalAveragePooling2D(name="gap")(x)


def min_convnet_size(n_convs: int) -> int:
    """The smallest image the convnet's unpadded 3x3 convolutions and 2x2 poolings leave at least 1 px of."""
    size = 1
    for _ in range(n_convs - 1):
        size = 2 * (size + 2)
    return size + 2


def build_scratch(scfg: DictConfig, n_classes: int, seed: int) -> keras.Model:
    """The ``scratch.model`` network for ``scratch.image_size`` px images, untrained."""
    if scfg.model not in MODELS:
        raise XferError(f"scratch.model: '{scfg.model}' is not one of {', '.join(MODELS)}")
    size = int(scfg.image_size)
    inputs = keras.Input((size, size, 3), name="image")
    x = augmentation(scfg.augment, seed)(inputs) if scfg.get("augment") else inputs
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    filters = list(scfg.filters)
    if scfg.model == "convnet" and size < min_convnet_size(len(filters)):
        raise XferError(f"scratch.image_size: {size} px is too small for convnet's {len(filters)} convolutions; "
                        f"use at least {min_convnet_size(len(filters))}")
    if scfg.model == "convnet":
        x = _convnet(x, filters)
    else:
        x = _xception_mini(x, filters, float(scfg.get("bn_momentum") or 0.99))
    if scfg.dropout:
        x = layers.Dropout(float(scfg.dropout), name="dropout")(x)
    if n_classes == 2:
        outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="prob")(x)
    else:
        outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="prob")(x)
    return keras.Model(inputs, outputs, name=str(scfg.name))
