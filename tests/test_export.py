"""Export: tiny generated models to every format (SavedModel, LiteRT float16/int8, ONNX), each run by its own
runtime and compared with the Keras model; the export stage on the tiny pipeline (reports, MLflow, predict)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY, tiny_project
from xfer import XferError
from xfer.core.config import load_params
from xfer.core.files import read_json
from xfer.nets.backbones import Preprocess
from xfer.nets.export import (
    FORMATS,
    TFLITE,
    _tflite,
    check_drop,
    check_formats,
    compact_tflite,
    computes_in_float32,
    digest,
    export_files,
    export_graph,
    float32_model,
    read_temperature,
    representative_set,
)
from xfer.nets.runtimes import Runtime, timed_passes

# Largest |probability difference| to the Keras model: float32 runtimes sum in another order (1e-4, see
# conftest.FLOAT32_ATOL); float16 weights round to 11 bits; int8 quantizes every activation to 256 levels.
TOLERANCE = {"savedmodel": 1e-4, "onnx": 1e-4, "litert_float16": 1e-2, "litert_int8": 0.08}


def tiny_model(n_out: int, seed: int = 0, augment: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.RandomFlip(seed=seed, name="random_flip")(image) if augment else image
    x = Preprocess("mobilenet", name="preprocess")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(n_out, activation="sigmoid" if n_out == 1 else "softmax", name="prob")(x)
    return keras.Model(image, out)


def images(n: int, seed: int = 1) -> np.ndarray:
    """Smooth random images (a gradient plus noise), so quantization ranges are like a photo's."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 32, dtype=np.float32)[None, None, :, None]
    return np.clip(ramp * rng.uniform(0, 1, (n, 1, 1, 3)) + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255
                   ).astype(np.float32)


def representative():
    for x in images(24, seed=2):
        yield [x[None]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(3)
    graph = export_graph(model, ["flip"])
    folder = tmp_path_factory.mktemp("export")
    return model, graph, export_files(graph, list(FORMATS), folder, representative)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_the_keras_models_probabilities_with_its_own_runtime(exported, fmt):
    model, graph, files = exported
    x = images(40)
    expected = graph.predict(x, verbose=0)
    runtime = Runtime(files[fmt])
    assert runtime.size == 32
    got = runtime.run(x)
    assert got.shape == (40, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOLERANCE[fmt]
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= (0.9 if fmt == "litert_int8" else 1.0)
    assert np.allclose(runtime.run(x[:1]), got[:1], atol=TOLERANCE[fmt])  # a batch of one (resized input)


def test_every_format_names_its_input_image_and_its_output_probabilities(exported):
    """The names models/export/model.json gives: signature keys (SavedModel, LiteRT), input/output names (ONNX)."""
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    _, _, files = exported
    signature = tf.saved_model.load(str(files["savedmodel"])).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["image"]
    assert list(signature.structured_outputs) == ["probabilities"]
    for fmt in TFLITE:
        assert Interpreter(model_path=str(files[fmt])).get_signature_list() == {
            "serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}}, fmt
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]


def test_the_graph_includes_preprocessing_tta_and_binary_probabilities():
    """Raw [0, 255] images in; a sigmoid model's (n, 1) as [1 - p, p], averaged with the mirror (tta: [flip])."""
    model = tiny_model(1)
    x = images(8)
    p, q = model.predict(x, verbose=0), model.predict(x[:, :, ::-1], verbose=0)
    want = np.mean([np.hstack([1 - p, p]), np.hstack([1 - q, q])], axis=0)
    assert np.allclose(export_graph(model, ["flip"]).predict(x, verbose=0), want, atol=1e-6)
    assert np.allclose(export_graph(model, []).predict(x, verbose=0), np.hstack([1 - p, p]), atol=1e-6)
    assert not np.allclose(want, np.hstack([1 - p, p]), atol=1e-4)  # the mirror does change something


def test_a_calibration_temperature_is_applied_inside_the_graph(tmp_path, exported):
    model, _, _ = exported
    path = tmp_path / "calibration.json"
    assert read_temperature(path) is None  # no file: no calibration
    path.write_text(json.dumps({"temperature": 2.5}))
    t = read_temperature(path)
    x = images(6)
    p = export_graph(model, []).predict(x, verbose=0)
    logits = np.log(p) / t
    want = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    graph = export_graph(model, [], t)
    assert np.allclose(graph.predict(x, verbose=0), want, atol=1e-5)
    files = export_files(graph, ["onnx", "litert_int8"], tmp_path / "out", representative)
    assert np.allclose(Runtime(files["onnx"]).run(x), want, atol=TOLERANCE["onnx"])
    assert np.allclose(Runtime(files["litert_int8"]).run(x), want, atol=TOLERANCE["litert_int8"])
    for bad in ('{"temperature": -1}', '{"t": 1}', "not json"):
        path.write_text(bad)
        with pytest.raises(XferError, match="calibration.json"):
            read_temperature(path)


def test_a_mixed_precision_model_is_exported_in_float32_without_its_augmentation():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model(3, augment=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy = float32_model(model)
    assert not computes_in_float32(model) and computes_in_float32(copy)
    assert computes_in_float32(tiny_model(3, augment=True))  # augmentation alone needs no second Keras pass
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert copy.get_layer("random_flip").__class__.__name__ == "Identity"
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in model.layers}
    x = images(4)
    assert np.allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0), atol=0.02)  # bfloat16: 8 bits


@keras.saving.register_keras_serializable(package="xfer_tests")
class Bessel(keras.layers.Layer):
    """An op neither LiteRT's builtins nor ONNX have."""

    def call(self, x):
        import tensorflow as tf

        return tf.math.bessel_i1e(x)


@pytest.mark.parametrize("fmt", ["litert_float16", "litert_int8", "onnx"])
def test_a_layer_the_converter_cannot_handle_fails_in_one_line_naming_format_and_layer(tmp_path, fmt):
    image = keras.Input((8, 8, 3), name="image")
    x = Bessel(name="odd_layer")(keras.layers.Conv2D(4, 3, name="conv")(image))
    model = keras.Model(image, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(XferError) as err:
        export_files(export_graph(model), [fmt], tmp_path, lambda: ([np.full((1, 8, 8, 3), 99.0, np.float32)]
                                                                    for _ in range(2)))
    message = str(err.value)
    assert message.startswith(f"export {fmt}: ") and "layer 'odd_layer'" in message and "BesselI1e" in message
    assert "\n" not in message and len(message) < 200


def test_litert_files_are_byte_reproducible_and_every_format_repeats_its_predictions(exported, tmp_path):
    _, graph, first = exported
    again = export_files(graph, list(FORMATS), tmp_path, representative)
    for fmt in ("litert_float16", "litert_int8"):
        assert digest(again[fmt]) == digest(first[fmt]), fmt
    x = images(16)
    for fmt in FORMATS:
        assert np.array_equal(Runtime(again[fmt]).run(x), Runtime(first[fmt]).run(x)), fmt


@pytest.mark.parametrize("fmt", TFLITE)
def test_litert_files_drop_inner_tensor_names_and_keep_the_input_output_and_signature(exported, tmp_path, fmt):
    """compact_tflite: the converter's fused op names go; the Interpreter sees the same input, output and signature
    and gives the same probabilities as the converter's own file; the bytes are the compacted converter bytes."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    _, _, files = exported
    raw = tmp_path / "raw.tflite"
    _tflite(files["savedmodel"], raw, fmt, representative, compact=False)
    assert compact_tflite(raw.read_bytes()) == files[fmt].read_bytes()  # reproducible: the stage's file, compacted
    model, before = flatbuffer_utils.read_model(str(files[fmt])), flatbuffer_utils.read_model(str(raw))
    graph, raw_graph = model.subgraphs[0], before.subgraphs[0]
    io = {int(i) for i in [*graph.inputs, *graph.outputs]}
    assert len(io) == 2 and all(not t.name for i, t in enumerate(graph.tensors) if i not in io)
    assert sum(len(t.name or b"") for t in raw_graph.tensors) > 40 * len(io)  # the converter's names were long
    assert [graph.tensors[i].name for i in io] == [raw_graph.tensors[i].name for i in io]
    assert b"image" in graph.tensors[int(graph.inputs[0])].name
    assert [[(t.name, t.tensorIndex) for t in s.inputs + s.outputs] for s in model.signatureDefs] == [
        [(t.name, t.tensorIndex) for t in s.inputs + s.outputs] for s in before.signatureDefs]
    assert len(model.buffers) == len(before.buffers) and len(graph.operators) == len(raw_graph.operators)
    assert files[fmt].stat().st_size < raw.stat().st_size
    x = images(8)
    assert np.array_equal(Runtime(files[fmt]).run(x), Runtime(raw).run(x))
    runner = Interpreter(model_path=str(files[fmt])).get_signature_runner("serving_default")
    (got,) = runner(image=x[:1]).values()
    assert np.array_equal(got, Runtime(raw).run(x[:1]))


def test_timed_passes_runs_each_function_on_every_batch_once_read():
    read = []

    def batches():
        for i in range(3):
            read.append(i)
            yield np.full((2, 1), i, np.float32)

    out, seconds, last = timed_passes({"double": lambda b: 2 * b, "same": lambda b: b}, batches())
    assert read == [0, 1, 2] and out["double"].ravel().tolist() == [0, 0, 2, 2, 4, 4]
    assert out["same"].shape == (6, 1) and last.ravel().tolist() == [2, 2]
    assert set(seconds) == {"read", "double", "same"} and all(v >= 0 for v in seconds.values())
    out, _, last = timed_passes({"same": lambda b: b}, iter([]))
    assert last is None and out["same"].size == 0


def test_the_int8_calibration_set_is_drawn_from_the_training_images_with_the_seed(tmp_path):
    from PIL import Image

    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(paths[-1])

    def drawn(seed):
        return [int(round(float(batch[0].mean()))) // 20 for batch in representative_set(paths, 16, 5, seed)()]

    first = drawn(42)
    assert len(first) == 5 and len(set(first)) == 5 and first == sorted(first) and drawn(42) == first
    assert drawn(7) != first
    assert all(b[0].shape == (1, 16, 16, 3) and b[0].dtype == np.float32 for b in representative_set(paths, 16, 2, 1)())
    assert len(list(representative_set(paths, 16, 50, 1)())) == 12  # never more than there are


def test_onnx_alone_is_converted_without_tracing_a_saved_model(exported, tmp_path):
    _, graph, _ = exported
    seconds: dict[str, float] = {}
    files = export_files(graph, ["onnx"], tmp_path, seconds=seconds)
    assert list(files) == list(seconds) == ["onnx"] and seconds["onnx"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    export_files(graph, ["litert_float16"], tmp_path / "lite", seconds=seconds)
    assert set(seconds) == {"onnx", "savedmodel", "litert_float16"}  # LiteRT converts from a SavedModel
    assert not (tmp_path / "lite/saved_model").exists()


def test_bad_formats_and_an_accuracy_drop_are_one_line():
    assert check_formats(["onnx", "savedmodel"]) == ["savedmodel", "onnx"]
    with pytest.raises(XferError, match="'tflite' is not one of savedmodel, litert_float16"):
        check_formats(["tflite"])
    assert check_formats([]) == [] and check_formats(None) == []  # nothing to export (the default)
    check_drop("onnx", 0.9, 0.904, 0.5)
    with pytest.raises(XferError, match=r"export litert_int8: test accuracy 89.00% is 1.00 points below the Keras "
                                        r"model's 90.00%"):
        check_drop("litert_int8", 0.89, 0.90, 0.5)


# The stage on the tiny pipeline: a random MobileNet (small, fast to convert) fine-tuned at 32 px, flip TTA.
STAGES = ["download", "split", "featurize", "views", "trunk", "train_head", "finetune", "evaluate", "export"]
EXTRA = ["backbone=mobilenet", "backbone.weights=null", "backbone.image_size=32", "backbone.unfreeze_from=conv_dw_13",
         f"export.formats=[{','.join(FORMATS)}]", "export.representative_images=8", "export.latency_repeats=3",
         "export.max_accuracy_drop=100"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with tiny_project(tmp_path_factory.mktemp("tiny") / "proj", STAGES, "export-under-test", EXTRA) as (root, cfg):
        yield root, cfg


def test_the_stage_reports_each_format_against_the_keras_model(tiny_run):
    root, _ = tiny_run
    report = read_json(root / "reports/export.json")
    metrics = read_json(root / "reports/metrics/export.json")
    evaluate = read_json(root / "reports/metrics/evaluate.json")
    assert report["test_images"] == 12 and report["tta"] == ["flip"] and report["cpu"]
    from xfer.nets.serving import Predictor

    model = Predictor.load(root / "models/model.keras", root / "data/raw/classes.json").model
    assert report["float32"] is computes_in_float32(model)  # whether the Keras reference needed a float32 copy
    assert report["keras"]["test_accuracy"] == pytest.approx(evaluate["test_accuracy"])
    assert set(report["formats"]) == set(FORMATS)
    for fmt, r in report["formats"].items():
        assert (root / "models/export" / r["file"]).exists()
        assert r["accuracy_diff_points"] == pytest.approx(100 * (r["test_accuracy"] - report["keras"]["test_accuracy"]))
        assert 0 <= r["max_probability_diff"] < TOLERANCE[fmt] and 0.8 <= r["class_agreement"] <= 1
        assert r["size_mb"] > 0 and r["latency_1_ms"] > 0 and r["latency_32_ms"] > 0
        assert len(r["sha256"]) == len(r["predictions_sha256"]) == 64
        for key in ("test_accuracy", "accuracy_diff_points", "size_mb", "latency_1_ms", "latency_32_ms"):
            assert metrics[f"{fmt}_{key}"] == pytest.approx(r[key], abs=1e-6)
        assert set(r["seconds"]) == {"convert", "check", "latency"} and all(v > 0 for v in r["seconds"].values())
        assert all(metrics[f"{fmt}_{k}_seconds"] == pytest.approx(v, abs=1e-3) for k, v in r["seconds"].items())
    # no Keras pass of its own (the reference is evaluate's probabilities) and no Keras timing unless asked
    assert set(report["stage_seconds"]) == {"saved_model_trace", "read_test_images"}
    assert not {"latency_1_ms", "latency_32_ms", "latency_1_call_ms"} & set(report["keras"])
    assert not [k for k in metrics if k.startswith("keras_latency") or k.endswith("speedup_1")]
    assert all("speedup_1" not in r for r in report["formats"].values())
    reference = np.load(root / "models/test_probabilities.npy")
    labels = pd.read_csv(root / "data/splits/test.csv")["label"].to_numpy()
    assert report["keras"]["test_accuracy"] == float(np.mean(reference.argmax(1) == labels))
    assert metrics["saved_model_trace_seconds"] == pytest.approx(report["formats"]["savedmodel"]["seconds"]["convert"],
                                                                 abs=1e-3)
    sizes = {fmt: r["size_vs_float32"] for fmt, r in report["formats"].items()}
    assert sizes["litert_int8"] < sizes["litert_float16"] < 1.0 < sizes["onnx"] * 1.5
    card = read_json(root / "models/export/model.json")
    assert card["classes"] == ["blobs", "stripes"] and card["input"]["shape"] == [None, 32, 32, 3]
    calibration = read_json(root / "models/calibration.json")  # evaluate's temperature, applied inside the graph
    assert card["tta"] == ["flip"] and card["temperature"] == pytest.approx(calibration["temperature"])
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_the_files_are_logged_tagged_on_the_model_version_and_summarized_in_the_parent(tiny_run):
    root, _ = tiny_run
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = read_json(root / "reports/runs/export.json")["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["upstream.evaluate"] == read_json(root / "reports/runs/evaluate.json")["run_id"]
    logged = {f.path for f in client.list_artifacts(run_id, "export")}
    assert {f"export/{name}" for name in FORMATS.values()} <= logged and "export/model.json" in logged
    version = client.get_model_version_by_alias("synthetic-classifier", "candidate")
    assert version.tags["export_run_id"] == run_id
    assert version.tags["export.litert_int8.uri"] == f"runs:/{run_id}/export/model_int8.tflite"
    metrics = read_json(root / "reports/metrics/export.json")
    assert float(version.tags["export.onnx.test_accuracy"]) == pytest.approx(metrics["onnx_test_accuracy"], 1e-3)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    for key in ("litert_int8_size_mb", "onnx_latency_1_ms", "savedmodel_accuracy_diff_points"):
        assert parent.data.metrics[f"export_{key}"] == pytest.approx(metrics[key])
    assert parent.data.metrics["test_accuracy"] == read_json(root / "reports/metrics/evaluate.json")["test_accuracy"]


def test_predict_takes_an_exported_file(tiny_run, tmp_path, monkeypatch, capsys):
    root, _ = tiny_run
    from xfer.nets.predict import main

    monkeypatch.chdir(root)
    folder = root / "data/raw/images/stripes"
    assert main([str(folder), "--out", str(tmp_path / "keras.csv"), "--tta", "flip"]) == 0
    keras_out = pd.read_csv(tmp_path / "keras.csv")
    for name in ("model.onnx", "model_float16.tflite", "saved_model"):
        assert main([str(folder), "--model", f"models/export/{name}", "--out", str(tmp_path / "x.csv")]) == 0
        out = pd.read_csv(tmp_path / "x.csv")
        assert list(out["class"]) == list(keras_out["class"]), name
        assert np.allclose(out["probability"], keras_out["probability"], atol=1e-2), name
    capsys.readouterr()
    assert main([str(folder), "--model", "models/export/model.onnx", "--tta", "flip"]) == 2
    assert "--tta does not apply to the exported file" in capsys.readouterr().err


def test_a_rerun_repeats_the_predictions_and_an_accuracy_drop_fails_leaving_the_files(tiny_run):
    root, _ = tiny_run
    from stages import export
    from xfer.core.config import load_params

    first = read_json(root / "reports/export.json")["formats"]
    export.main(load_params([*TINY, *EXTRA]))  # a rerun: the same LiteRT bytes, the same predictions everywhere
    again = read_json(root / "reports/export.json")["formats"]
    assert all(again[f]["predictions_sha256"] == first[f]["predictions_sha256"] for f in FORMATS)
    assert all(again[f]["sha256"] == first[f]["sha256"] for f in ("litert_float16", "litert_int8"))
    before = {p.name: digest(p) for p in (root / "models/export").iterdir()}
    report = (root / "reports/export.json").read_bytes()
    cfg = load_params([*TINY, *EXTRA, "export.formats=[litert_int8]", "export.max_accuracy_drop=-1"])
    with pytest.raises(XferError, match=r"^export litert_int8: test accuracy [\d.]+% is -?[\d.]+ points below the "
                                        r"Keras model's [\d.]+% \(export.max_accuracy_drop -1"):
        export.main(cfg)
    assert {p.name: digest(p) for p in (root / "models/export").iterdir()} == before
    assert (root / "reports/export.json").read_bytes() == report
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]


# Last in this module: they rerun the stage with other files and formats.
def test_a_missing_or_mismatched_reference_is_refused_in_one_line_naming_it(tiny_run):
    from stages import export

    root, _ = tiny_run
    path = root / "models/test_probabilities.npy"
    saved, before = path.read_bytes(), {p.name: digest(p) for p in (root / "models/export").iterdir()}
    cfg = load_params([*TINY, *EXTRA])
    try:
        path.unlink()
        with pytest.raises(XferError, match=r"^models/test_probabilities.npy not found .*run `dvc repro evaluate`"):
            export.main(cfg)
        for shape in ((11, 2), (12, 3), (12,)):
            np.save(path, np.full(shape, 0.5, np.float32))
            with pytest.raises(XferError) as err:
                export.main(cfg)
            assert str(err.value).startswith(f"models/test_probabilities.npy holds {'x'.join(map(str, shape))} ")
            assert "12 images of 2 classes" in str(err.value) and "\n" not in str(err.value)
        path.write_bytes(b"not an array")
        with pytest.raises(XferError, match=r"^models/test_probabilities.npy: not a readable .npy file"):
            export.main(cfg)
    finally:
        path.write_bytes(saved)
    assert {p.name: digest(p) for p in (root / "models/export").iterdir()} == before


def test_each_format_is_gated_against_evaluates_probabilities(tiny_run):
    """The reference is the file, not a Keras pass: a perfect reference (100 %) makes a format that is not
    perfect fail export.max_accuracy_drop; a lax gate reports the format against it."""
    from stages import export

    root, _ = tiny_run
    path = root / "models/test_probabilities.npy"
    saved = path.read_bytes()
    labels = pd.read_csv(root / "data/splits/test.csv")["label"].to_numpy()
    accuracy = read_json(root / "reports/export.json")["formats"]["litert_float16"]["test_accuracy"]
    assert accuracy < 1  # a random-weight model on 12 test images: the gate has something to catch
    try:
        np.save(path, np.eye(2, dtype=np.float32)[labels])
        cfg = [*TINY, *EXTRA, "export.formats=[litert_float16]"]
        with pytest.raises(XferError, match=r"^export litert_float16: test accuracy [\d.]+% is [\d.]+ points below "
                                            r"the Keras model's 100.00% \(export.max_accuracy_drop 0.5\)"):
            export.main(load_params([*cfg, "export.max_accuracy_drop=0.5"]))
        export.main(load_params(cfg))
        report = read_json(root / "reports/export.json")
        r = report["formats"]["litert_float16"]
        assert report["keras"]["test_accuracy"] == 1.0 and r["test_accuracy"] == pytest.approx(accuracy)
        assert r["accuracy_diff_points"] == pytest.approx(100 * (accuracy - 1)) and r["max_probability_diff"] > 0.5
    finally:
        path.write_bytes(saved)


def test_keras_latency_is_measured_only_when_asked(tiny_run):
    from stages import export

    root, _ = tiny_run
    export.main(load_params([*TINY, *EXTRA, "export.formats=[litert_float16]", "export.keras_latency=true"]))
    report, metrics = read_json(root / "reports/export.json"), read_json(root / "reports/metrics/export.json")
    k, r = report["keras"], report["formats"]["litert_float16"]
    assert all(k[key] > 0 for key in ("latency_1_ms", "latency_32_ms", "latency_1_call_ms"))
    assert r["speedup_1"] == pytest.approx(k["latency_1_ms"] / r["latency_1_ms"])
    assert metrics["keras_latency_1_ms"] == pytest.approx(k["latency_1_ms"], abs=1e-6)
    assert metrics["litert_float16_speedup_1"] == pytest.approx(r["speedup_1"], abs=1e-6)
    assert set(report["stage_seconds"]) == {"saved_model_trace", "read_test_images", "keras_latency"}
    assert "model.predict" in report["latency"]


def test_no_formats_writes_only_the_model_card_without_loading_the_model(tiny_run, capsys, monkeypatch):
    """export.formats: [] (the default): nothing converted, checked or timed; the model card, an empty report and
    metrics, one line saying how to list formats. Last in this file: it replaces the files the tests above read."""
    from stages import export
    from xfer.nets import serving

    root, _ = tiny_run
    monkeypatch.setattr(serving.Predictor, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    export.main(load_params([*TINY, *EXTRA, "export.formats=[]"]))
    assert [p.name for p in (root / "models/export").iterdir()] == ["model.json"]
    card = read_json(root / "models/export/model.json")
    assert card["files"] == {} and card["input"]["shape"] == [None, 32, 32, 3] and card["tta"] == ["flip"]
    assert read_json(root / "reports/export.json")["formats"] == {}
    assert read_json(root / "reports/metrics/export.json") == {}
    out = capsys.readouterr().out
    assert "nothing exported (export.formats is empty)" in out and "export.formats=[litert_float16]" in out
