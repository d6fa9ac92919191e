"""Benchmark: the from-scratch baselines (conf/scratch/) against transfer learning on the same split: test accuracy,
epochs, wall and CPU time of each, next to the book's figures.

usage: python bench/baselines.py ARCHIVE WEIGHTS [--models convnet convnet_augmented xception_mini]
           [--split 500 150 400] [--preset mobilenet-offline] [--work DIR] [OVERRIDE ...]
e.g.   python bench/baselines.py ../shared/data/petimages-dev.zip \\
           ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5
A copy of the project in --work downloads and splits the archive once (per-class train/val/test counts, seed 42),
runs the transfer pipeline (featurize -> ... -> evaluate, --preset, real weights) and then the scratch stage once
per model with its default epochs (`scratch=<model> OVERRIDE ...`). CPU time is the stage process's user + system
time (robust to other load; wall time is not). Prints a markdown table and the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402
from vs_reference import STAGES, prepare, sh  # noqa: E402

BOOK = {"convnet": "69-70 % (30 epochs, 2,000 train images)", "convnet_augmented": "83.5 % (100 epochs)",
        "xception_mini": "~88 % (100 epochs)", "head": "97.5 % (VGG16 features, 2,000 train images)",
        "finetuned": "98.5 % (VGG16 fine-tuned)"}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    sh(cmd, cwd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("overrides", nargs="*", help="params for the scratch runs, e.g. scratch.epochs=5")
    ap.add_argument("--models", nargs="+", default=["convnet", "convnet_augmented", "xception_mini"])
    ap.add_argument("--split", type=int, nargs=3, default=[500, 150, 400], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xfer-baselines")
    args = ap.parse_intermixed_args()
    proj, env = prepare(args)
    py = sys.executable
    rows = []
    wall = cpu_s = 0.0
    for stage in STAGES:
        w, c = timed([py, "-m", f"stages.{stage}", "evaluate.register=false"], proj, env)
        wall, cpu_s = wall + w, cpu_s + c
    m = json.loads((proj / "reports/evaluate.json").read_text())
    runs = {s: json.loads((proj / f"reports/runs/{s}.json").read_text()) for s in ("train_head", "finetune")}
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    epochs = {s: int(client.get_run(r["run_id"]).data.metrics.get("stopped_epoch", 0)) for s, r in runs.items()}
    tta = "+" + "+".join(m["tta"]) + " TTA" if m["tta"] else "no TTA"
    rows.append({"model": f"{args.preset} head on cached features", "test accuracy": m["head_test_accuracy"],
                 "epochs": epochs["train_head"], "book": BOOK["head"]})
    if epochs["finetune"]:
        rows.append({"model": f"{args.preset} fine-tuned ({tta})", "test accuracy": m["test_accuracy"],
                     "epochs": f"{epochs['train_head']} + {epochs['finetune']}", "book": BOOK["finetuned"]})
    rows[-1].update({"wall s": round(wall), "CPU s": round(cpu_s)})
    for name in args.models:
        w, c = timed([py, "-m", "stages.scratch", f"scratch={name}", *args.overrides], proj, env)
        r = json.loads((proj / "reports/scratch.json").read_text())
        curves = pd.read_csv(proj / "reports/plots/scratch.csv")
        last = curves.iloc[-1]
        row = {"model": f"scratch/{name} ({'+'.join(r['tta']) + ' TTA' if r['tta'] else 'no TTA'})",
               "test accuracy": r["test_accuracy"],
               "without TTA": r["test_accuracy_without_tta"],
               "epochs": f"{r['stopped_epoch']} (best {r.get('best_epoch')})", "wall s": round(w), "CPU s": round(c),
               "s / epoch": round(w / r["stopped_epoch"], 1),
               "last epoch train / val acc": f"{last['accuracy']:.3f} / {last['val_accuracy']:.3f}",
               "book": BOOK.get(name, "-")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows).fillna("")
    print(f"\nsplit per class {args.split} (train/val/test), seed 42; transfer: experiment={args.preset}")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
