"""Benchmark: the export stage's formats against the Keras model (goals for LiteRT int8: accuracy within 0.5
points, file <= 35 % of the float model's, single-image latency >= 2x faster than Keras `predict`).

usage: python bench/export.py [reports/export.json]
Reads the report `dvc repro export` wrote (with export.formats including litert_int8 and export.keras_latency=true,
which times the Keras model the speed-up goal is against), prints the README table and checks the goals; exit 1
when one is missed. The size goal is checked both ways: against the float32 weights (4
bytes per parameter, in the report) and against a float32 LiteRT file of the same graph, which this script
converts from models/export/saved_model (or, without it, from models/model.keras with the TTA and temperature of
models/export/model.json) and writes the way the stage writes its LiteRT files (compact_tflite). It also prints
where the int8 file's bytes go (weights by type, quantization parameters, tensor names, the rest: operators,
shapes, signature, metadata, flatbuffer tables). Run it where the pipeline ran, e.g. after
    python -m xfer params experiment=mobilenet-offline data.url=/path/to/petimages-dev.zip split.train=500 \\
        split.val=150 split.test=400 'export.formats=[savedmodel,litert_float16,litert_int8,onnx]' \\
        export.keras_latency=true && dvc repro
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"accuracy_diff_points": -0.5, "size_vs_float32": 0.35, "size_vs_float32_litert": 0.35, "speedup_1": 2.0}


def table(report: dict) -> str:
    k = report["keras"]
    timed = "latency_1_ms" in k  # export.keras_latency=true
    rows = ["| format | test accuracy | diff (points) | max prob. diff (vs float32 Keras) | agreement | "
            "size MB (vs float32) | 1 image ms (speed-up) | 32 images ms |", "|---|---|---|---|---|---|---|---|",
            f"| Keras `predict` | {100 * k['test_accuracy']:.2f} % | | | | {k['size_mb']:.2f} (1.00) | "
            + (f"{k['latency_1_ms']:.1f} | {k['latency_32_ms']:.1f} |" if timed else "not timed | |")]
    if "latency_1_call_ms" in k:
        copy = "" if report.get("float32") else f" (float32 copy: {100 * k['float32_test_accuracy']:.2f} %)"
        rows.append(f"| Keras `model(x)`{copy} | | | | | | {k['latency_1_call_ms']:.1f} | |")
    for fmt, r in report["formats"].items():
        rows.append(f"| {fmt} | {100 * r['test_accuracy']:.2f} % | {r['accuracy_diff_points']:+.2f} | "
                    f"{r['max_probability_diff']:.4f} ({r.get('max_probability_diff_float32', float('nan')):.4f}) | "
                    f"{100 * r['class_agreement']:.2f} % | {r['size_mb']:.2f} "
                    f"({r['size_vs_float32']:.2f}) | {r['latency_1_ms']:.2f}"
                    + (f" ({r['speedup_1']:.1f}x) | " if "speedup_1" in r else " | ")
                    + f"{r['latency_32_ms']:.1f} |")
    return "\n".join(rows)


def breakdown(path: Path) -> dict[str, int]:
    """Bytes of a LiteRT file by what they hold: constant buffers by tensor type, quantization parameters (float32
    scales, int64 zero points), tensor names, and the rest (operators, shapes, signature, metadata, tables)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    out: dict[str, int] = {}
    for graph in model.subgraphs:
        for t in graph.tensors:
            data = model.buffers[t.buffer].data if t.buffer else None
            if data is not None and len(data):
                key = f"buffers {flatbuffer_utils.type_to_name(t.type).lower()}"
                out[key] = out.get(key, 0) + len(data)
            q = t.quantization
            if q is not None:
                n = sum(4 * len(v) for v in (q.scale, q.min, q.max) if v is not None)
                out["quantization parameters"] = out.get("quantization parameters", 0) + n + (
                    8 * len(q.zeroPoint) if q.zeroPoint is not None else 0)
            out["tensor names"] = out.get("tensor names", 0) + len(t.name or b"")
    out["rest"] = path.stat().st_size - sum(out.values())
    return out


def float32_litert(folder: Path) -> int:
    """Size of a float32 LiteRT file of the exported graph, written like the stage's (compact_tflite)."""
    from xfer.nets.export import _tflite, export_graph

    with tempfile.TemporaryDirectory() as tmp:
        saved = folder / "saved_model"
        if not (saved / "saved_model.pb").is_file():
            from xfer.nets.serving import Predictor

            card, project = json.loads((folder / "model.json").read_text()), folder.parents[1]
            saved = Path(tmp) / "saved_model"
            model = Predictor.load(project / "models/model.keras", project / "data/raw/classes.json").model
            graph = export_graph(model, card["tta"], card["temperature"])
            graph.export(str(saved), format="tf_saved_model", verbose=False)
        target = Path(tmp) / "model_float32.tflite"
        _tflite(saved, target, "litert_float32", None)
        return target.stat().st_size


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/export.json")
    report = json.loads(path.read_text())
    print(f"{report['test_images']} test images; CPU: {report['cpu']}; {report['latency']}")
    int8 = report["formats"].get("litert_int8")
    if int8 is None:
        print(table(report))
        print("litert_int8 not exported: add it to export.formats")
        return 1
    folder = path.resolve().parents[1] / "models/export"
    int8_bytes = (folder / int8["file"]).stat().st_size
    f32 = float32_litert(folder)
    int8["size_vs_float32_litert"] = int8_bytes / f32
    print(table(report))
    print(f"int8 file {int8_bytes} bytes = {100 * int8['size_vs_float32']:.1f} % of the float32 weights "
          f"({1e6 * report['keras']['size_mb']:.0f} bytes), {100 * int8['size_vs_float32_litert']:.1f} % of a "
          f"float32 LiteRT file of the same graph ({f32} bytes)")
    parts = breakdown(folder / int8["file"])
    print("int8 file bytes: " + ", ".join(f"{k} {v} ({100 * v / int8_bytes:.1f} %)" for k, v in parts.items()))
    low = {"accuracy_diff_points", "speedup_1"}  # at least the goal; the sizes at most
    missed = [f"{key} {int8[key]:.3f}" for key, goal in GOALS.items() if key in int8
              and (round(int8[key], 6) < goal if key in low else round(int8[key], 6) > goal)]
    missed += [f"{key} not measured (export.keras_latency=true times the Keras model)" for key in GOALS
               if key not in int8]
    print("int8 goals: " + ("all met" if not missed else "missed: " + ", ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
