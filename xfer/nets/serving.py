"""The trained model as an image-in, class-out predictor, and its MLflow pyfunc wrapper for serving."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xfer import XferError
from xfer.core.runtime import quiet_mlflow

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


TTA_VIEWS = ("flip",)  # test-time augmentation: views whose probabilities are averaged with the image's


def check_tta(tta) -> list[str]:
    """A list of TTA views (``[]`` or ``[flip]``); anything else is refused in one line."""
    views = list(tta or [])
    for view in views:
        if view not in TTA_VIEWS:
            raise ValueError(f"tta: '{view}' is not one of {', '.join(TTA_VIEWS)} (or an empty list)")
    return views


def evaluate_tta(cfg) -> list[str]:
    """``evaluate.tta`` checked (:func:`check_tta`), a bad view refused as an error naming the key."""
    try:
        return check_tta(cfg.evaluate.tta)
    except ValueError as exc:
        raise XferError(f"evaluate.{exc}") from None


class Predictor:
    """A Keras image model plus its class names: ``predict(images) -> DataFrame[class, probability]``.
    With ``tta=["flip"]`` the probabilities are the mean over the image and its horizontal mirror; ``temperature``
    (evaluate's calibration, models/calibration.json) then scales them (the predicted class stays the same)."""

    def __init__(self, model, classes: list[str], tta=(), temperature: float = 1.0):
        self.model, self.classes, self.tta = model, list(classes), check_tta(tta)
        self.size, self.temperature = int(model.input_shape[1]), float(temperature)

    @classmethod
    def load(cls, model_path: str | Path, classes_path: str | Path, tta=(), temperature: float = 1.0) -> Predictor:
        import keras

        import xfer.nets.backbones  # noqa: F401 - registers the Preprocess layer
        import xfer.nets.models  # noqa: F401 - registers the smoothed loss

        return cls(keras.saving.load_model(str(model_path)), json.loads(Path(classes_path).read_text()), tta,
                   temperature)

    def views(self, batch: np.ndarray, plain: bool = True) -> list[np.ndarray]:
        """(n, k) class probabilities of each view: the batch itself first (unless not ``plain``), then each TTA
        view."""
        from xfer.track.metrics import as_matrix

        out = [as_matrix(self.model.predict(batch, verbose=0, batch_size=32))] if plain else []
        if "flip" in self.tta:
            out.append(as_matrix(self.model.predict(batch[:, :, ::-1, :], verbose=0, batch_size=32)))
        return out

    def views_of_files(self, paths: list[str], labels: np.ndarray, batch_size: int, plain: bool = True
                       ) -> list[np.ndarray]:
        """:meth:`views` over image files read as in training (xfer.data.images), each view's (n, k) in file order."""
        from xfer.data.images import image_dataset

        batches = [self.views(x.numpy(), plain) for x, _ in image_dataset(paths, labels, self.size, batch_size)]
        return [np.concatenate([b[i] for b in batches]) for i in range(len(batches[0]))] if batches else []

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(n, k) calibrated class probabilities: the views' mean, temperature-scaled."""
        from xfer.nets.calibrate import scale

        return scale(np.mean(self.views(batch), axis=0), self.temperature)

    def decode_all(self, images: list) -> np.ndarray:
        """Image files' bytes (or arrays) as one batch the model takes."""
        return np.stack([decode(img, self.size) for img in images])

    def predict(self, images: list) -> pd.DataFrame:
        return self.predict_batch(self.decode_all(images))

    def predict_batch(self, batch: np.ndarray) -> pd.DataFrame:
        p = self.probabilities(batch)
        idx = p.argmax(axis=1)
        return pd.DataFrame({"class": [self.classes[i] for i in idx], "probability": p.max(axis=1)})


class ImageClassifier(_PythonModel):
    """MLflow pyfunc: a DataFrame with an ``image`` column (file bytes, or base64 over REST; decoded arrays
    from Python) -> a DataFrame with ``class`` and ``probability`` (with the TTA and temperature evaluate used)."""

    def load_context(self, context) -> None:
        path = context.artifacts.get("settings")
        settings = json.loads(Path(path).read_text()) if path else {}
        self.predictor = Predictor.load(context.artifacts["keras_model"], context.artifacts["classes"],
                                        settings.get("tta", []), float(settings.get("temperature", 1.0)))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        return self.predictor.predict(list(images))


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability")]))


def registered_name(cfg) -> str:
    """``evaluate.registered_model``, or ``<data.name>-classifier`` when that is null."""
    return cfg.evaluate.registered_model or f"{cfg.data.name}-classifier"


def register(cfg, run, classes_path, model_path, metrics: dict, temperature: float = 1.0) -> str:
    """Log the pyfunc `classifier` (raw images in, calibrated probabilities out with ``temperature``) and register
    it, described with its test metrics, data and parameters; move the `candidate` alias to the new version."""
    import keras
    import mlflow
    import tensorflow as tf

    from xfer.core.retry import retry_locked
    from xfer.track.summary import model_card

    name = registered_name(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Path(tmp) / "settings.json"
        settings.write_text(json.dumps({"tta": list(cfg.evaluate.tta or []), "temperature": float(temperature)}))
        info = retry_locked(
            mlflow.pyfunc.log_model,
            name="classifier", python_model=ImageClassifier(), signature=signature(),
            artifacts={"keras_model": str(model_path), "classes": str(classes_path), "settings": str(settings)},
            code_paths=["xfer"],
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                              f"mlflow=={mlflow.__version__}", "pillow", "pandas", "omegaconf", "scikit-learn"],
        )
    client = mlflow.MlflowClient()
    description, tags = model_card(cfg, client.get_run(run.info.run_id), metrics)
    chatter = io.StringIO()  # register_model prints "Successfully registered ..." / "Created version ..."
    with contextlib.redirect_stderr(chatter):  # the version created with its tags: one call, not one per tag
        version = retry_locked(mlflow.register_model, info.model_uri, name, tags=tags).version
    for line in chatter.getvalue().splitlines():
        if not line.startswith(("Successfully registered model", "Created version", "Registered model")):
            print(line, file=sys.stderr)
    retry_locked(client.update_model_version, name, version, description=description)
    retry_locked(client.set_registered_model_alias, name, "candidate", version)
    return f"models:/{name}@candidate (version {version})"
