"""The trained model as an image-in, class-out predictor, and its MLflow pyfunc wrapper for serving."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xfer.runtime import quiet_mlflow

quiet_mlflow()
try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the predictor usable without it
    _PythonModel = object


def decode(image, size: int) -> np.ndarray:
    """File bytes (any format PIL reads) or an HxWx3 / HxW array -> float32 (size, size, 3) in [0, 255],
    resized exactly as in training (tf.image.resize, bilinear)."""
    import tensorflow as tf
    from PIL import Image, ImageOps

    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as img:
            arr = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        arr = arr[..., :3]
    return tf.image.resize(arr, (size, size)).numpy().astype(np.float32)


class Predictor:
    """A Keras image model plus its class names: ``predict(images) -> DataFrame[class, probability]``."""

    def __init__(self, model, classes: list[str]):
        self.model, self.classes = model, list(classes)
        self.size = int(model.input_shape[1])

    @classmethod
    def load(cls, model_path: str | Path, classes_path: str | Path) -> Predictor:
        import keras

        import xfer.models  # noqa: F401 - registers the Preprocess layer

        return cls(keras.saving.load_model(str(model_path)), json.loads(Path(classes_path).read_text()))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        from xfer.metrics import as_matrix

        return as_matrix(self.model.predict(batch, verbose=0, batch_size=32))

    def predict(self, images: list) -> pd.DataFrame:
        p = self.probabilities(np.stack([decode(img, self.size) for img in images]))
        idx = p.argmax(axis=1)
        return pd.DataFrame({"class": [self.classes[i] for i in idx], "probability": p.max(axis=1)})


class ImageClassifier(_PythonModel):
    """MLflow pyfunc: a DataFrame with an ``image`` column (file bytes, or base64 over REST; decoded arrays
    from Python) -> a DataFrame with ``class`` and ``probability``."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.load(context.artifacts["keras_model"], context.artifacts["classes"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        return self.predictor.predict(list(images))


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability")]))
