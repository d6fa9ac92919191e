"""Benchmark: fine-tuning on images (finetune.trunk_views=0) against fine-tuning on K cached augmented views at
the boundary (K = 2, 4): test accuracy and wall time, real weights, several seeds, mean ± std.

usage: python bench/trunk_views.py ARCHIVE WEIGHTS [--preset mobilenet-offline] [--views 0 2 4] [--seeds 1 2 3]
           [--split 500 150 400] [--epochs 4] [--work DIR] [OVERRIDE ...]
e.g.   python bench/trunk_views.py ../shared/data/petimages-dev.zip \\
           ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 finetune.enabled=true
       python bench/trunk_views.py ../shared/data/petimages-dev.zip weights/vgg16_offline_notop.weights.h5 \\
           --preset vgg16-offline --split 250 100 250 --epochs 3
A copy of the project in --work downloads, splits (per-class counts, split seed 42) and featurizes once; per seed
the head is trained once, then per K the trunk, finetune and evaluate stages run (fine-tuning for exactly
--epochs epochs, no early stopping; evaluate with flip TTA, nothing registered). Prints one markdown table
(test accuracy without and with TTA, trunk-stage and finetune-stage seconds, seconds per fine-tuning epoch)
and the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402
from vs_reference import prepare, sh  # noqa: E402

COLUMNS = ("fine-tuned", "+ flip TTA", "trunk stage s", "finetune stage s", "s / epoch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("overrides", nargs="*", help="params for every run, e.g. backbone.image_size=224")
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--views", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--split", type=int, nargs=3, default=[500, 150, 400], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xfer-trunk-views")
    args = ap.parse_intermixed_args()
    proj, env = prepare(args)

    def stage(name: str, *overrides: str) -> tuple[str, float]:
        return sh([sys.executable, "-m", f"stages.{name}", *args.overrides, *overrides], proj, env)

    _, featurize_s = stage("featurize")
    print(f"featurize {featurize_s:.0f} s", flush=True)
    results: dict[int, list[tuple[float, ...]]] = {}
    for seed in args.seeds:
        common = [f"seed={seed}", "evaluate.tta=[flip]", "evaluate.register=false", f"finetune.epochs={args.epochs}",
                  "finetune.patience=null"]
        stage("views", *common)
        stage("train_head", *common)
        for k in args.views:
            run = [*common, f"finetune.trunk_views={k}"]
            _, trunk_s = stage("trunk", *run)
            out, finetune_s = stage("finetune", *run)
            stage("evaluate", *run)
            details = json.loads(out.strip().splitlines()[-1].split("finetune: ", 1)[1])
            m = json.loads((proj / "reports/metrics/evaluate.json").read_text())
            row = (m["test_accuracy_without_tta"] * 100, m["test_accuracy"] * 100, trunk_s, finetune_s,
                   details["mean_epoch_seconds"])
            results.setdefault(k, []).append(row)
            print(f"K={k} seed {seed}: " + ", ".join(f"{c} {v:.1f}" for c, v in zip(COLUMNS, row, strict=True)),
                  flush=True)

    def cell(rows: list[tuple[float, ...]], i: int) -> str:
        values = [r[i] for r in rows]
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"

    print(f"\nexperiment={args.preset} {' '.join(args.overrides)}; split per class {args.split} (train/val/test); "
          f"seeds {args.seeds}; fine-tuning {args.epochs} epochs; featurize {featurize_s:.0f} s (once); "
          "test accuracy %, mean ± std")
    print("| finetune.trunk_views | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for k, rows in results.items():
        print(f"| {k} | " + " | ".join(cell(rows, i) for i in range(len(COLUMNS))) + " |")
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
