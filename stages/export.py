"""Export stage: the final model as deployable files (export.formats: SavedModel, LiteRT float16, LiteRT int8,
ONNX; see xfer/nets/export.py for what the graph takes and returns), each checked by its own runtime on the test
images against the Keras model: the test probabilities evaluate reported (models/test_probabilities.npy), so the
Keras model is not run again (only its float32 copy, when it computes in another precision).

Outputs models/export/ (the files, and model.json describing input, output and classes), reports/export.json and
reports/metrics/export.json (per format: test accuracy and its difference to the Keras model, largest probability
difference, class agreement, size, single-image and batch-32 latency on this CPU, and the seconds its conversion,
check and latency timing took; with export.keras_latency: true also the Keras model's latency and each format's
speed-up over it). A format more than export.max_accuracy_drop points below the Keras model fails
the stage and nothing is written. The files are logged to this stage's MLflow run and tagged on the model version
evaluate registered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_dir, read_json, write_json
from xfer.data.paths import (
    CALIBRATION,
    CLASSES,
    FINAL_MODEL,
    METRICS,
    MODELS,
    REPORTS,
    RUNS,
    TEST_PROBABILITIES,
    image_paths,
    read_manifest,
)
from xfer.track.recorder import log_artifact, log_dict, log_metrics
from xfer.track.runs import log_inputs, stage_run
from xfer.track.store import answers, tracking_uri

EXPORT = MODELS / "export"
REPORT = REPORTS / "export.json"
SECTIONS = ["export", "evaluate.tta", "seed", "backbone.name"]  # the params this stage reads, logged to its run
# Per format in reports/metrics/export.json (as <format>_<key>); the rest stays in reports/export.json.
COMPARED = ("test_accuracy", "accuracy_diff_points", "max_probability_diff", "class_agreement", "size_mb",
            "size_vs_float32", "latency_1_ms", "latency_32_ms", "speedup_1")


def nothing_to_export(cfg: DictConfig, card: dict) -> None:
    """export.formats: [] (the default): no file to convert or check, so a head edit's rerun costs nothing here;
    models/export/ holds only the model card, the registered MLflow model (evaluate) is what ships."""
    with stage_run("export", cfg, SECTIONS):
        with atomic_dir(EXPORT) as tmp:
            write_json(tmp / "model.json", card)
        write_json(REPORT, {"formats": {}, "exported": "nothing: export.formats is empty"})
        write_json(METRICS / "export.json", {})
    print("export: nothing exported (export.formats is empty); list the formats you ship, e.g. "
          "dvc exp run -S 'export.formats=[litert_float16]'")


def main(cfg: DictConfig) -> None:
    from xfer.data.images import image_dataset
    from xfer.nets.export import (
        FORMATS,
        check_formats,
        compare_formats,
        computes_in_float32,
        digest,
        export_files,
        export_graph,
        model_card,
        read_temperature,
        reference_probabilities,
        representative_set,
        size_bytes,
    )
    from xfer.nets.runtimes import Runtime, cpu_name, latency_ms, timed_passes
    from xfer.nets.serving import Predictor, evaluate_tta
    from xfer.track.summary import tag_model_version

    e = cfg.export
    formats = check_formats(e.formats)
    tta = evaluate_tta(cfg)
    for path in (FINAL_MODEL, CLASSES):
        if not path.is_file():
            raise XferError(f"{path} not found; run the pipeline up to evaluate first (dvc repro evaluate)")
    classes = read_json(CLASSES)
    temperature = read_temperature(CALIBRATION)
    test = read_manifest("test")
    y = test["label"].to_numpy()
    # The reference: the probabilities evaluate reported (the Keras model in its own precision, with the TTA and
    # temperature the graph applies), instead of a Keras pass of our own over the test images.
    reference = reference_probabilities(TEST_PROBABILITIES, len(y), len(classes))
    if not formats:
        return nothing_to_export(cfg, model_card(int(cfg.backbone.image_size), classes, tta, temperature,
                                                 cfg.backbone.name, {}))
    timed = bool(e.keras_latency)
    with stage_run("export", cfg, SECTIONS) as run:
        log_inputs(cfg, "train", "test")
        model = Predictor.load(FINAL_MODEL, CLASSES).model
        size = int(model.input_shape[1])
        graph = export_graph(model, tta, temperature)
        # a Keras pass only when the model's precision is not float32: the float32 graph the converters saw is
        # compared too (what conversion alone changes; its augmentation layers, identity at inference, change nothing)
        mixed = not computes_in_float32(model)
        rep = representative_set(image_paths(read_manifest("train")), size, int(e.representative_images), int(cfg.seed))
        with atomic_dir(EXPORT) as tmp:
            convert: dict[str, float] = {}
            files = export_files(graph, formats, tmp, rep, convert)
            runtimes = {fmt: Runtime(path) for fmt, path in files.items()}
            runs = {fmt: rt.run for fmt, rt in runtimes.items()}
            if mixed:
                runs["keras_float32"] = lambda b: graph.predict(b, verbose=0, batch_size=32)
            probs, check, batch = timed_passes(runs, (x.numpy() for x, _ in image_dataset(image_paths(test), y,
                                                                                        size, 32)))
            ref32 = probs.pop("keras_float32", reference)
            ref_acc = float(np.mean(reference.argmax(1) == y))
            results = compare_formats(y, reference, ref32, probs, float(e.max_accuracy_drop))
            float32_bytes = 4 * int(model.count_params())
            one, many = batch[:1], np.concatenate([batch] * -(-32 // len(batch)))[:32]
            repeats = int(e.latency_repeats)
            keras = {"test_accuracy": ref_acc, "float32_test_accuracy": float(np.mean(ref32.argmax(1) == y)),
                     "size_mb": float32_bytes / 1e6, "size_vs_float32": 1.0}
            seconds = {"saved_model_trace": convert.get("savedmodel", 0.0), "read_test_images": check.pop("read")}
            if timed:  # export.keras_latency: the Keras model (its own precision) timed on the same batches
                start, own = time.perf_counter(), export_graph(model, tta, temperature, float32=False)
                keras.update(latency_1_ms=latency_ms(lambda b: own.predict(b, verbose=0), one, repeats),
                             latency_32_ms=latency_ms(lambda b: own.predict(b, verbose=0), many, repeats),
                             latency_1_call_ms=latency_ms(lambda b: own(b, training=False), one, repeats))
                seconds["keras_latency"] = time.perf_counter() - start
            if mixed:
                seconds["keras_float32_check"] = check.pop("keras_float32")
            for fmt, r in results.items():
                rt, start = runtimes[fmt], time.perf_counter()
                r.update(file=FORMATS[fmt], sha256=digest(files[fmt]), size_mb=size_bytes(files[fmt]) / 1e6,
                         size_vs_float32=size_bytes(files[fmt]) / float32_bytes,
                         latency_1_ms=latency_ms(rt.run, one, repeats), latency_32_ms=latency_ms(rt.run, many, repeats))
                if timed:
                    r["speedup_1"] = keras["latency_1_ms"] / r["latency_1_ms"]
                r["seconds"] = {"convert": convert[fmt], "check": check[fmt], "latency": time.perf_counter() - start}
            write_json(tmp / "model.json", model_card(size, classes, tta, temperature, cfg.backbone.name, files))
            del runtimes
        keras_timing = ("Keras: model.predict (latency_1_call_ms: model(x) without predict's overhead) of the same "
                        "graph" if timed else "Keras not timed (export.keras_latency: false)")
        report = {"cpu": cpu_name(), "test_images": len(y), "tta": tta, "temperature": temperature,
                  "float32": not mixed, "latency": f"median of {repeats} runs after 2 warm-ups; {keras_timing}",
                  "reference": f"evaluate's test probabilities ({TEST_PROBABILITIES}: the Keras model as evaluate ran "
                  "it, in its own precision); max_probability_diff_float32: against the float32 graph the converters "
                  "were given", "seconds": "wall time of each format's conversion, check (its runtime on the test "
                  "images) and latency timing; saved_model_trace: the SavedModel the LiteRT converters start from "
                  "(savedmodel's conversion, paid for any LiteRT format too)", "stage_seconds": seconds,
                  "keras": keras, "formats": results}
        write_json(REPORT, report)
        flat = {f"keras_{k}": round(float(v), 6) for k, v in keras.items()}
        flat.update({f"{fmt}_{k}": round(float(r[k]), 6) for fmt, r in results.items() for k in COMPARED if k in r})
        flat.update({f"{fmt}_{k}_seconds": round(v, 3) for fmt, r in results.items() for k, v in r["seconds"].items()})
        flat.update({f"{k}_seconds": round(v, 3) for k, v in seconds.items()})
        write_json(METRICS / "export.json", flat)
        log_metrics(flat)
        log_dict(report, "export.json")
        for path in sorted(p for p in EXPORT.rglob("*") if p.is_file()):  # through the non-blocking recorder
            log_artifact(path, str(Path("export") / path.parent.relative_to(EXPORT)))
        if answers(tracking_uri()):
            version = tag_model_version(read_json(RUNS / "evaluate.json")["run_id"]
                                        if (RUNS / "evaluate.json").is_file() else None, run.info.run_id, flat, results)
        else:  # the run's records wait in the spool; the files are kept
            version = "model version not tagged: the tracking server did not answer (`dvc repro -f export` later)"
    shown = {fmt: {"acc_diff": round(r["accuracy_diff_points"], 2), "MB": round(r["size_mb"], 2),
                   "ms": round(r["latency_1_ms"], 2)} for fmt, r in results.items()}
    keras_ms = f"keras {keras['latency_1_ms']:.1f} ms/image; " if timed else ""
    print(f"export: {json.dumps(shown)}; {keras_ms}{version}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
