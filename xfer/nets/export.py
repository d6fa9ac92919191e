"""Export: the trained Keras model as deployable files — a TensorFlow SavedModel, LiteRT (float16, full int8) and
ONNX — each one graph from raw RGB images to class probabilities, with the TTA and calibration evaluate applies.

The exported graph (every format): input ``image`` float32 (batch, S, S, 3), RGB values in [0, 255] at the model's
fixed input size S (resized by the caller, bilinear like :func:`xfer.nets.serving.decode`); the backbone's
``preprocess_input`` is inside. Output ``probabilities`` float32 (batch, classes), rows summing to one (binary
models too: [p(class 0), p(class 1)]), classes in data/raw/classes.json order. ``tta: [flip]`` averages the
image's and its mirror's probabilities inside the graph; a temperature in models/calibration.json (``{"temperature":
T}``) is applied after that (probabilities -> log -> /T -> softmax). The names are the SavedModel's and LiteRT's
``serving_default`` signature keys and ONNX's input and output names. The int8 file is fully integer inside, with a
float32 input and output (the converter's quantize/dequantize ops at both ends), so callers feed the same floats.
The converters get the model as it predicts: in float32 (whatever precision it was trained in) and without its
augmentation layers. Running the files and timing them is :mod:`xfer.nets.runtimes`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np

from xfer import XferError
from xfer.nets.runtimes import quiet

# format -> file name under models/export/
FORMATS = {"savedmodel": "saved_model", "litert_float16": "model_float16.tflite",
           "litert_int8": "model_int8.tflite", "onnx": "model.onnx"}
TFLITE = ("litert_float16", "litert_int8")


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats to export, in FORMATS order (none: the export stage only writes the model card); an unknown one
    is refused in one line."""
    chosen = list(formats or [])
    for name in chosen:
        if name not in FORMATS:
            raise XferError(f"export.formats: '{name}' is not one of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in chosen]


def read_temperature(path: str | Path) -> float | None:
    """The temperature of a calibration file (``{"temperature": T}``, T > 0, checked by
    :func:`xfer.nets.calibrate.read_temperature`), or None when there is no file (nothing to apply)."""
    from xfer.nets.calibrate import read_temperature as calibrated

    return calibrated(path) if Path(path).is_file() else None


class Mirror(keras.layers.Layer):
    """Horizontal flip of an NHWC batch (the TTA view)."""

    def call(self, x):
        return keras.ops.flip(x, axis=2)


class ClassProbabilities(keras.layers.Layer):
    """The model's output as (n, k) class probabilities: a sigmoid's (n, 1) as [1 - p, p]; then, with a
    ``temperature``, softmax(log(p) / T)."""

    def __init__(self, temperature: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def call(self, p):
        if p.shape[-1] == 1:
            p = keras.ops.concatenate([1.0 - p, p], axis=-1)
        if self.temperature is not None:
            p = keras.ops.softmax(keras.ops.log(keras.ops.maximum(p, 1e-12)) / self.temperature, axis=-1)
        return p


def _is_augmentation(layer) -> bool:
    """Keras's random preprocessing layers (finetune's augmentation): identity at inference, but their random
    ops stay in a traced graph, and LiteRT/ONNX have none of them."""
    return type(layer).__name__.startswith("Random") and type(layer).__module__.startswith("keras.")


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    for a, b in zip(source.layers, target.layers, strict=True):
        if isinstance(a, keras.Model):
            _copy_weights(a, b)
        elif b.weights:
            b.set_weights(a.get_weights())


def computes_in_float32(model: keras.Model) -> bool:
    """Whether every layer of the model (nested ones too) computes in float32."""
    return all(layer.dtype_policy.name == "float32" for layer in _all_layers(model))


def float32_model(model: keras.Model) -> keras.Model:
    """The model as it predicts, for the converters: computing in float32 (LiteRT and ONNX need it; it may have been
    trained under a mixed bfloat16/float16 policy) and without its augmentation layers, with the same weights."""
    if computes_in_float32(model) and not any(map(_is_augmentation, _all_layers(model))):
        return model

    def fix(node):
        if isinstance(node, dict):
            if "DTypePolicy" in str(node.get("class_name", "")) and isinstance(node.get("config"), dict):
                return {**node, "class_name": "DTypePolicy", "config": {**node["config"], "name": "float32"}}
            if str(node.get("class_name", "")).startswith("Random") and str(node.get("module", "")).startswith(
                    "keras") and isinstance(node.get("config"), dict):
                node = {**node, "class_name": "Identity", "module": "keras.layers", "registered_name": None,
                        "config": {"name": node["config"]["name"], "dtype": node["config"].get("dtype")}}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return "float32" if node in ("mixed_bfloat16", "mixed_float16", "bfloat16", "float16") else node

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone = model.__class__.from_config(fix(model.get_config()))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    _copy_weights(model, clone)
    return clone


def export_graph(model: keras.Model, tta: Iterable[str] = (), temperature: float | None = None,
                 float32: bool = True) -> keras.Model:
    """Raw images in [0, 255] -> class probabilities, as the registered pyfunc computes them (see module doc).
    ``float32=False`` keeps the model's own precision (the Keras reference the exported files are checked against)."""
    model = float32_model(model) if float32 else model
    size = int(model.input_shape[1])
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    views = [ClassProbabilities(name="plain")(model(image))]
    if "flip" in list(tta):
        views.append(ClassProbabilities(name="mirrored")(model(Mirror(name="mirror")(image))))
    p = keras.layers.Average(name="tta_mean")(views) if len(views) > 1 else views[0]
    p = ClassProbabilities(temperature, name="probabilities")(p) if temperature is not None else p
    p = keras.layers.Activation("linear", name="probabilities_out")(p)
    return keras.Model(image, p, name="exported")


def _layer_in(path: str, graph: keras.Model) -> str | None:
    """The deepest Keras layer named in a TensorFlow op path (``exported_1/functional_1/odd_1/Op``)."""
    names = {layer.name for layer in _all_layers(graph) if not isinstance(layer, keras.Model)}
    for part in reversed(path.split("/")):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in names:
                return candidate
    return None


def _converter_failure(fmt: str, exc: BaseException, graph: keras.Model) -> XferError:
    """A converter's traceback as one line naming the format and the layer (and op) it could not handle."""
    text = " ".join(str(exc).split())
    op = re.search(r"'tfl?\.(\w+)' op is neither|legalize operation '?tfl?\.(\w+)|Custom ops: (\w+)", text)
    op_name = next((g for g in op.groups() if g), None) if op else None
    layer = None
    if op_name:
        where = re.search(rf'"{re.escape(op_name)}:", "([^"@]+)', text)
        layer = _layer_in(where.group(1), graph) if where else None
    what = f"layer '{layer}'" if layer else "the model"
    first = text.split(" Details:")[0]
    return XferError(f"export {fmt}: the converter cannot handle {what}" + (f" (op {op_name})" if op_name else "")
                     + ("" if op_name else f": {first[:200]}") + "; choose other export.formats or change the layer")


def check_onnx(path: Path, graph: keras.Model) -> None:
    """tf2onnx leaves an op it cannot convert in the graph under its TensorFlow name: refuse the file, naming it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if not onnx.defs.has(node.op_type, node.domain or ""):
            layer = _layer_in(node.name, graph)
            raise XferError(f"export onnx: the converter cannot handle "
                            f"{f'layer {layer!r}' if layer else 'the model'} (op {node.op_type}); choose other "
                            "export.formats or change the layer")


def _all_layers(model: keras.Model) -> list:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _all_layers(layer)
    return out


def _tflite(saved_model: Path, target: Path, fmt: str, representative: Callable[[], Iterable] | None,
            compact: bool = True) -> None:
    """Convert a SavedModel to LiteRT: ``litert_float16``, ``litert_int8`` (full integer, calibrated on
    ``representative``) or ``litert_float32`` (no optimization: the size reference of bench/export.py); then
    :func:`compact_tflite` unless ``compact=False``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if fmt == "litert_float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "litert_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    target.write_bytes(compact_tflite(converter.convert()) if compact else converter.convert())


def compact_tflite(flatbuffer: bytes) -> bytes:
    """A LiteRT flatbuffer without the names of its inner tensors: the converter names each one after the
    TensorFlow ops fused into it (``exported_1/mobilenet_0.25_224_1/conv_pw_13_bn/FusedBatchNormV3;...``, up to
    hundreds of bytes each, about 9 % of a small int8 MobileNet). Nothing reads them at run time; the graph's input
    and output tensors keep theirs, and the signature (``image`` in, ``probabilities`` out), the metadata and
    every buffer stay, so the Interpreter gives the same outputs. Buffers are written 16-byte aligned, as the
    schema asks (``force_align: 16``). The bytes are a function of the converter's (reproducible if those are)."""
    import flatbuffers
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    for j, graph in enumerate(model.subgraphs):
        kept = {int(i) for i in [*graph.inputs, *graph.outputs]}
        kept |= {t.tensorIndex for s in model.signatureDefs or [] if s.subgraphIndex == j
                 for t in [*(s.inputs or []), *(s.outputs or [])]}
        for i, tensor in enumerate(graph.tensors):
            if i not in kept:
                tensor.name = None
    model.buffers = [_AlignedBuffer(b) for b in model.buffers]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class _AlignedBuffer:
    """A LiteRT ``BufferT`` that packs its bytes 16-byte aligned (the generated Python code aligns to 1)."""

    def __init__(self, buffer):
        self.buffer = buffer

    def Pack(self, builder):  # noqa: N802 - the flatbuffers object API's name
        from tensorflow.lite.python import schema_py_generated as schema

        b, data = self.buffer, None
        if b.data is not None:
            payload = np.asarray(b.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head -= len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, b.offset)
        schema.BufferAddSize(builder, b.size)
        return schema.BufferEnd(builder)


def representative_set(paths: list[str], size: int, n: int, seed: int):
    """The int8 calibration set: ``n`` training images drawn with ``seed``, as a converter's generator."""
    from xfer.data.images import image_dataset

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(n, len(paths)), replace=False).tolist())
    picked = [paths[i] for i in chosen]

    def gen():
        for x, _ in image_dataset(picked, np.zeros(len(picked), int), size, 1):
            yield [x.numpy().astype(np.float32)]

    return gen


def export_files(graph: keras.Model, formats: list[str], folder: Path,
                 representative: Callable[[], Iterable] | None = None,
                 seconds: dict[str, float] | None = None) -> dict[str, Path]:
    """Write each format's file into ``folder`` (FORMATS names); ``representative`` yields ``[batch]`` lists of
    float32 images for the int8 calibration. A conversion failure is one XferError naming format and layer.
    ``seconds`` receives each format's conversion time; ``savedmodel``'s whenever a LiteRT format is listed too:
    their converters start from the SavedModel (ONNX alone does not need it)."""
    import tempfile

    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    seconds = {} if seconds is None else seconds
    # The same layers with the output keyed "probabilities": the SavedModel's and LiteRT's signature output and
    # ONNX's output are then named so (a bare tensor would be "output_0" / "Identity:0").
    named = keras.Model(graph.inputs, {"probabilities": graph.outputs[0]}, name=graph.name)
    spec = tf.TensorSpec((None, *graph.input_shape[1:]), tf.float32, name="image")
    with tempfile.TemporaryDirectory() as tmp:
        saved = folder / FORMATS["savedmodel"] if "savedmodel" in formats else Path(tmp) / "saved_model"
        if "savedmodel" in formats or set(TFLITE) & set(formats):
            start = time.perf_counter()
            try:
                with quiet():
                    named.export(str(saved), format="tf_saved_model", verbose=False)
            except Exception as exc:  # noqa: BLE001 - any converter failure becomes one line
                raise _converter_failure("savedmodel", exc, graph) from None
            seconds["savedmodel"] = time.perf_counter() - start
        if "savedmodel" in formats:
            out["savedmodel"] = saved
        for fmt in formats:
            if fmt == "savedmodel":
                continue
            target = folder / FORMATS[fmt]
            if fmt == "litert_int8" and representative is None:
                raise XferError("export litert_int8: no representative images for the int8 calibration")
            start = time.perf_counter()
            try:
                with quiet():
                    if fmt in TFLITE:
                        _tflite(saved, target, fmt, representative)
                    else:
                        named.export(str(target), format="onnx", verbose=False, input_signature=[spec])
                if fmt == "onnx":
                    check_onnx(target, graph)
            except XferError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _converter_failure(fmt, exc, graph) from None
            seconds[fmt] = time.perf_counter() - start
            out[fmt] = target
    return out


def model_card(size: int, classes: list[str], tta: Iterable[str], temperature: float | None, backbone: str,
               files: Iterable[str]) -> dict:
    """models/export/model.json: what every exported file takes and returns (see the module doc)."""
    return {"input": {"name": "image", "dtype": "float32", "shape": [None, size, size, 3],
                      "values": "RGB in [0, 255], resized by the caller (bilinear) to the fixed size"},
            "output": {"name": "probabilities", "dtype": "float32", "shape": [None, len(classes)]},
            "classes": list(classes), "tta": list(tta), "temperature": temperature, "backbone": backbone,
            "files": {fmt: FORMATS[fmt] for fmt in files}}


def size_bytes(path: Path) -> int:
    """A file's size, or a folder's (every file in it)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def reference_probabilities(path: str | Path, rows: int, n_classes: int) -> np.ndarray:
    """Evaluate's test probabilities (models/test_probabilities.npy: what it reported, calibrated and with its TTA,
    i.e. what the exported graph must reproduce), checked against the test manifest's rows and the classes; a
    missing, unreadable or mismatched file is refused in one line."""
    path = Path(path)
    redo = "; run `dvc repro evaluate` first"
    if not path.is_file():
        raise XferError(f"{path} not found (evaluate's test probabilities, the export reference){redo}")
    try:
        probs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise XferError(f"{path}: not a readable .npy file ({' '.join(str(exc).split())[:100]}){redo}") from None
    if probs.ndim != 2 or probs.shape != (rows, n_classes):
        raise XferError(f"{path} holds {'x'.join(map(str, probs.shape))} probabilities but the test manifest has "
                        f"{rows} images of {n_classes} classes (written for other data){redo}")
    return probs.astype(np.float32, copy=False)


def agreement(y: np.ndarray, reference: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """One exported file's test predictions against the Keras model's: accuracy, its difference in points, the
    largest absolute probability difference, the share of images given the same class."""
    acc, ref = float(np.mean(probs.argmax(1) == y)), float(np.mean(reference.argmax(1) == y))
    return {"test_accuracy": acc, "accuracy_diff_points": 100 * (acc - ref),
            "max_probability_diff": float(np.abs(probs - reference).max()) if len(y) else 0.0,
            "class_agreement": float(np.mean(probs.argmax(1) == reference.argmax(1))) if len(y) else 1.0}


def check_drop(fmt: str, accuracy: float, reference: float, max_drop_points: float) -> None:
    """Refuse a format whose test accuracy is more than ``max_drop_points`` below the Keras model's."""
    drop = 100 * (reference - accuracy)
    if drop > max_drop_points + 1e-9:
        raise XferError(f"export {fmt}: test accuracy {100 * accuracy:.2f}% is {drop:.2f} points below the Keras "
                        f"model's {100 * reference:.2f}% (export.max_accuracy_drop {max_drop_points}); nothing "
                        "was written")


def compare_formats(y: np.ndarray, reference: np.ndarray, reference32: np.ndarray, probs: dict[str, np.ndarray],
                    max_drop_points: float) -> dict[str, dict]:
    """Each format's test probabilities against the reference (:func:`agreement`; ``max_probability_diff_float32``
    against the float32 graph's, the same array when the model computes in float32), with a digest of its
    predictions (rounded to 1e-4: what stays the same when a converter's bytes do not); a format more than
    ``max_drop_points`` below the reference's accuracy is refused (:func:`check_drop`)."""
    import hashlib

    results = {fmt: agreement(y, reference, p) for fmt, p in probs.items()}
    for fmt, p in probs.items():
        results[fmt]["max_probability_diff_float32"] = float(np.abs(p - reference32).max()) if len(y) else 0.0
        results[fmt]["predictions_sha256"] = hashlib.sha256(np.round(p, 4).astype("<f4").tobytes()).hexdigest()
    reference_accuracy = float(np.mean(reference.argmax(1) == y))
    for fmt, r in results.items():
        check_drop(fmt, r["test_accuracy"], reference_accuracy, max_drop_points)
    return results
