"""Benchmark: the recipe ablation behind the README's table — each change alone against the book's recipe, on
real weights, several seeds, mean ± std of test accuracy.

usage: python bench/ablation.py ARCHIVE WEIGHTS [--seeds 1 2 3] [--split 500 150 400] [--preset mobilenet-offline]
           [--finetune-epochs 4] [--only ROW ...] [--work DIR]
e.g.   python bench/ablation.py ../shared/data/petimages-dev.zip ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5
A copy of the project in --work downloads and splits the archive once (per-class counts, split seed 42); the seeds
vary everything after the split (views, head and fine-tuning initialisation, shuffling, augmentation). Head rows
train only the head (`python -m stages.train_head`) and score it on the cached test features; fine-tuning rows run
finetune -> evaluate (with `evaluate.tta=[flip]`, which reports the accuracy with and without the flip). Prints
one markdown table and the CPU.
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

BOOK_HEAD = ["head=flatten"]
GAP = ["head=gap"]
COSINE = ["finetune.learning_rate=1e-4", "finetune.schedule=cosine", "finetune.warmup_epochs=1"]
# (row, image size, train_views, overrides); head rows first, grouped by image size and views (shared caches)
HEAD_ROWS = [
    ("book head: Flatten-Dense(256)-Dropout(0.5)", 224, 0, BOOK_HEAD),
    ("GAP head", 224, 0, GAP),
    ("GAP head, no dropout", 224, 0, [*GAP, "head.dropout=0"]),
    ("GAP head, L2 1e-3", 224, 0, [*GAP, "head.l2=1e-3"]),
    ("GAP head, label smoothing 0.1", 224, 0, [*GAP, "head.label_smoothing=0.1"]),
    ("GAP head, warm-up 2 + cosine", 224, 0, [*GAP, "head.schedule=cosine", "head.warmup_epochs=2"]),
    ("GAP head, train_views 2", 224, 2, GAP),
    ("GAP head, train_views 4", 224, 4, GAP),
    ("GAP head, 288 px", 288, 0, GAP),
    ("GAP head, 320 px", 320, 0, GAP),
]
# fine-tuning rows start from the GAP head at 224 px, no views
FINETUNE_ROWS = [
    ("fine-tune from conv_dw_12, RMSprop 1e-5 (book)", ["backbone.unfreeze_from=conv_dw_12"]),
    ("fine-tune from conv_dw_12, 1e-4 warm-up 1 + cosine", ["backbone.unfreeze_from=conv_dw_12", *COSINE]),
    ("fine-tune from conv_dw_11, 1e-4 warm-up 1 + cosine", ["backbone.unfreeze_from=conv_dw_11", *COSINE]),
    ("fine-tune from conv_dw_13, 1e-4 warm-up 1 + cosine", ["backbone.unfreeze_from=conv_dw_13", *COSINE]),
]


def head_test_accuracy(proj: Path) -> float:
    """The trained head on the cached test features (what evaluate reports as head_test_accuracy)."""
    import keras
    import numpy as np

    head = keras.saving.load_model(str(proj / "models/head.keras"), compile=False)
    feats = proj / "data/features/mobilenet"
    x, y = np.load(feats / "test_features.npy"), np.load(feats / "test_labels.npy")
    p = head.predict(x, batch_size=256, verbose=0)
    pred = (p[:, 0] > 0.5).astype(int) if p.shape[-1] == 1 else p.argmax(-1)
    return float((pred == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--split", type=int, nargs=3, default=[500, 150, 400], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="row numbers to run (1-based), default all")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xfer-ablation")
    args = ap.parse_args()
    proj, env = prepare(args)
    wanted = {int(i) for i in args.only} if args.only else None
    results: dict[str, list[tuple[float, ...]]] = {}

    def stage(name: str, *overrides: str) -> None:
        sh([sys.executable, "-m", f"stages.{name}", *overrides], proj, env)

    def report(row: str, values: tuple[float, ...], seed: int) -> None:
        results.setdefault(row, []).append(values)
        print(f"{row} seed {seed}: {' / '.join(f'{v:.4f}' for v in values)}", flush=True)

    featurized = views = None
    for number, (row, size, k, overrides) in enumerate(HEAD_ROWS, 1):
        if wanted and number not in wanted:
            continue
        if featurized != size:
            stage("featurize", f"backbone.image_size={size}")
            featurized, views = size, None
        for seed in args.seeds:
            common = [f"backbone.image_size={size}", f"seed={seed}", f"featurize.train_views={k}"]
            if views != (k, seed):
                stage("views", *common)
                views = (k, seed)
            stage("train_head", *common, *overrides)
            report(row, (head_test_accuracy(proj),), seed)
    for number, (row, overrides) in enumerate(FINETUNE_ROWS, len(HEAD_ROWS) + 1):
        if wanted and number not in wanted:
            continue
        if featurized != 224:
            stage("featurize", "backbone.image_size=224")
            featurized, views = 224, None
        for seed in args.seeds:
            common = ["backbone.image_size=224", f"seed={seed}", "featurize.train_views=0", *GAP,
                      f"finetune.epochs={args.finetune_epochs}", "evaluate.tta=[flip]", "evaluate.register=false"]
            if views != (0, seed):
                stage("views", *common)
                views = (0, seed)
            stage("train_head", *common)  # the same GAP head for every fine-tuning row of this seed
            stage("finetune", *common, *overrides)
            stage("evaluate", *common)
            m = json.loads((proj / "reports/metrics/evaluate.json").read_text())
            report(row, (m["head_test_accuracy"], m["test_accuracy_without_tta"], m["test_accuracy"]), seed)

    def cell(rows: list[tuple[float, ...]], i: int) -> str:
        values = [r[i] * 100 for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    print(f"\nMobileNet v1 alpha 0.25, ImageNet weights; split per class {args.split} (train/val/test), seeds "
          f"{args.seeds}; fine-tuning {args.finetune_epochs} epochs; test accuracy %, mean ± std")
    print("| recipe | head | fine-tuned | fine-tuned + flip TTA |")
    print("|---|---|---|---|")
    for row, rows in results.items():
        cells = [cell(rows, i) for i in range(len(rows[0]))] + ["–"] * (3 - len(rows[0]))
        print(f"| {row} | {' | '.join(cells)} |")
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
