"""The backbone: a Keras Applications network without its top, configured (``backbone.kwargs``), with its
weights (ImageNet, random or a file) and its own preprocessing as a layer; precision; the fine-tuning boundary."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import keras
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.files import read_json
from xfer.data.paths import feature_dir
from xfer.nets.features import BASE_WEIGHTS


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


def set_precision(precision: str, table: dict[str, str] | None = None) -> str:
    """Keras mixed precision: ``auto`` (the backbone's measured ``table``, see
    :func:`xfer.core.runtime.auto_precision`) | ``float32`` | ``bfloat16`` | ``float16`` compute; returns the
    precision set."""
    from xfer.core.runtime import auto_precision

    if precision == "auto":
        precision = auto_precision(table=dict(table) if table else None)
    if precision not in PRECISIONS:
        raise XferError(f"runtime.precision: '{precision}' is not one of auto, {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])
    return precision


# Constructor options that build_base sets itself (the top is never included).
OWN_OPTIONS = {"include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
               "classifier_activation", "name"}


def constructor_kwargs(ctor, bcfg: DictConfig) -> dict:
    """``backbone.kwargs`` checked against the constructor's signature (e.g. ``alpha`` for MobileNet)."""
    import inspect

    kwargs = dict(bcfg.get("kwargs") or {})
    accepted = [p for p in inspect.signature(ctor).parameters if p not in OWN_OPTIONS]
    for key in kwargs:
        if key not in accepted:
            raise XferError(f"backbone.kwargs.{key}: keras.applications.{bcfg.constructor} has no option '{key}'; "
                            f"accepted: {', '.join(accepted) or 'none'}")
    return kwargs


def _load_weights(cnn: keras.Model, path: Path, what: str) -> None:
    """A Keras 3 ``.weights.h5`` or a Keras 2 ``.h5`` weights file (as Keras Applications publishes them)."""
    try:
        cnn.load_weights(str(path))
    except Exception as exc:
        raise XferError(f"{what} {path} do not fit {cnn.name}: {' '.join(str(exc).split())[:160]}") from None


def build_base(bcfg: DictConfig, weights_file: str | Path | None = None, pooling: str | None = None) -> keras.Model:
    """The backbone without its top: images in [0, 255] -> feature maps (or vectors with ``pooling`` avg/max),
    preprocessing included. ``bcfg.kwargs`` go to the Keras Applications constructor.

    ``bcfg.weights``: imagenet, null (random) or a ``.weights.h5`` / Keras-2 ``.h5`` file for the whole network.
    ``weights_file`` (the ``.weights.h5`` of the cut network that featurize saved) takes precedence.
    """
    try:
        ctor = getattr(keras.applications, bcfg.constructor)
    except AttributeError:
        raise XferError(f"backbone.constructor: keras.applications has no '{bcfg.constructor}'") from None
    kwargs = constructor_kwargs(ctor, bcfg)
    weights = bcfg.weights if weights_file is None else None
    user_file = None
    if weights not in (None, "imagenet"):
        user_file, weights = Path(weights), None
        if not user_file.is_file():
            raise XferError(f"backbone.weights: file {user_file} not found; use imagenet, null or a "
                            ".weights.h5 / Keras-2 .h5 path")
    size = int(bcfg.image_size)
    try:
        cnn = ctor(include_top=False, weights=weights, input_shape=(size, size, 3), **kwargs)
    except Exception as exc:  # Keras raises a plain Exception for a failed weights download
        url = re.search(r"https?://\S+?\.h5", str(exc))
        if weights != "imagenet" or not url:
            raise XferError(f"backbone: keras.applications.{bcfg.constructor}(**{kwargs}) failed: "
                            f"{' '.join(str(exc).split())[:200]}") from None
        name = url.group(0).rsplit("/", 1)[-1]
        raise XferError(f"backbone.weights=imagenet: could not download {name} (offline?); copy it from "
                        f"{url.group(0)} into ~/.keras/models/, or pass backbone.weights=/path/to/file.weights.h5"
                        ) from None
    if user_file is not None:  # the whole network's weights, before any cut
        _load_weights(cnn, user_file, "backbone.weights")
    if bcfg.feature_layer:
        try:
            out = cnn.get_layer(bcfg.feature_layer).output
        except ValueError:
            raise XferError(f"backbone.feature_layer: {bcfg.constructor} has no layer '{bcfg.feature_layer}'") \
                from None
        cnn = keras.Model(cnn.input, out, name=cnn.name)
    if weights_file is not None:
        _load_weights(cnn, Path(weights_file), "cached backbone weights")
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


def cached_base(bcfg: DictConfig) -> tuple[keras.Model, dict]:
    """The base exactly as featurize built it (its saved weights, pooling and precision) and featurize's
    meta.json, for the stages that run images through it again (views, finetune)."""
    features = feature_dir(bcfg.name)
    if not (features / "meta.json").is_file():
        raise XferError(f"{features}/meta.json not found; run the featurize stage for backbone '{bcfg.name}' first")
    meta = read_json(features / "meta.json")
    set_precision(meta["precision"])
    return build_base(bcfg, features / BASE_WEIGHTS, pooling=meta["pooling"]), meta


def backbone_cnn(base: keras.Model) -> keras.Model:
    """The Keras Applications network inside a model made by :func:`build_base`."""
    return next(layer for layer in base.layers if isinstance(layer, keras.Model))


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
