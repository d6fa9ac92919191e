"""Benchmark: the export stage's formats against the Keras model (goals for LiteRT int8: accuracy within 0.5
points, file <= 35 % of the float32 model's weights, single-image latency >= 2x faster than Keras `predict`).

usage: python bench/export.py [reports/export.json]
Reads the report `dvc repro export` wrote (with export.formats including litert_int8), prints the README table and
checks the goals; exit 1 when one is missed. Run it where the pipeline ran, e.g. after
    python -m xfer params experiment=mobilenet-offline data.url=/path/to/petimages-dev.zip split.train=500 \\
        split.val=150 split.test=400 'export.formats=[savedmodel,litert_float16,litert_int8,onnx]' && dvc repro
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOALS = {"accuracy_diff_points": -0.5, "size_vs_float32": 0.35, "speedup_1": 2.0}


def table(report: dict) -> str:
    k = report["keras"]
    rows = ["| format | test accuracy | diff (points) | max prob. diff (vs float32 Keras) | agreement | "
            "size MB (vs float32) | 1 image ms (speed-up) | 32 images ms |", "|---|---|---|---|---|---|---|---|",
            f"| Keras `predict` | {100 * k['test_accuracy']:.2f} % | | | | {k['size_mb']:.2f} (1.00) | "
            f"{k['latency_1_ms']:.1f} | {k['latency_32_ms']:.1f} |"]
    if "latency_1_call_ms" in k:
        rows.append(f"| Keras `model(x)` (float32 copy: {100 * k['float32_test_accuracy']:.2f} %) | | | | | | "
                    f"{k['latency_1_call_ms']:.1f} | |")
    for fmt, r in report["formats"].items():
        rows.append(f"| {fmt} | {100 * r['test_accuracy']:.2f} % | {r['accuracy_diff_points']:+.2f} | "
                    f"{r['max_probability_diff']:.4f} ({r.get('max_probability_diff_float32', float('nan')):.4f}) | "
                    f"{100 * r['class_agreement']:.2f} % | {r['size_mb']:.2f} "
                    f"({r['size_vs_float32']:.2f}) | {r['latency_1_ms']:.2f} ({r['speedup_1']:.1f}x) | "
                    f"{r['latency_32_ms']:.1f} |")
    return "\n".join(rows)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/export.json")
    report = json.loads(path.read_text())
    print(f"{report['test_images']} test images; CPU: {report['cpu']}; {report['latency']}")
    print(table(report))
    int8 = report["formats"].get("litert_int8")
    if int8 is None:
        print("litert_int8 not exported: add it to export.formats")
        return 1
    missed = [f"{key} {int8[key]:.3f}" for key, goal in GOALS.items()
              if (round(int8[key], 6) < goal if key != "size_vs_float32" else round(int8[key], 6) > goal)]
    print("int8 goals: " + ("all met" if not missed else "missed: " + ", ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
