"""Benchmark: the pipeline's speed against the book's code, side by side in one run on one machine, same split,
same weights.

(a) One VGG16 fine-tuning epoch (training + validation), the book's setting (180 px, block5 unfrozen, Flatten
    head, RMSprop 1e-5): the pipeline (finetune.trunk_views=K: the top on cached boundary views, validation
    through the top on activations computed once) against the reference script (the whole network on augmented
    images every epoch, validation on images), both for --epochs epochs; seconds per epoch, their ratio, the
    one-off costs, and test accuracy after those epochs. Goal: >= 3x faster, losing no more than 0.5 point.
(b) The whole MobileNet pipeline (experiment=mobilenet-offline, featurize -> evaluate) against the whole reference
    script (feature extraction, feature extraction with augmentation, 10 fine-tuning epochs). Goal: >= 2.5x faster.

usage: python bench/speed.py ARCHIVE VGG16_WEIGHTS MOBILENET_WEIGHTS REFERENCE [--split 250 100 250] [--epochs 3]
           [--mobilenet-split 500 150 400]
           [--views 2] [--fe-aug-epochs 2] [--seeds 1] [--only vgg16|mobilenet] [--work DIR]
e.g.   python bench/speed.py ../shared/data/petimages-dev.zip weights/vgg16/vgg16_offline_notop.weights.h5 \\
           ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 ../shared/tools/reference_recipe.py
VGG16_WEIGHTS: the stand-in from ../shared/tools/make_offline_vgg16_weights.py (no ImageNet download here).
Prints both comparisons and the CPU (model name and flags).
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
from vs_reference import prepare, run_pipeline, run_reference, sh  # noqa: E402

BOOK_VGG16 = ["backbone.feature_layer=null", "backbone.unfreeze_from=block5_conv1", "head=flatten",
              "finetune.patience=null", "evaluate.tta=[]", "evaluate.register=false"]


def vgg16_epochs(args) -> list[str]:
    a = argparse.Namespace(**{**vars(args), "preset": "vgg16-offline", "weights": args.vgg16_weights,
                              "work": args.work / "vgg16", "ref_backbone": "vgg16", "ref_size": 180,
                              "ref_finetune_epochs": args.epochs})
    proj, env = prepare(a)
    run = [*BOOK_VGG16, f"finetune.epochs={args.epochs}", f"finetune.trunk_views={args.views}"]
    times = {}
    for stage in ("featurize", "views", "trunk", "train_head", "finetune", "evaluate"):
        out, times[stage] = sh([sys.executable, "-m", f"stages.{stage}", *run], proj, env)
        if stage == "finetune":
            details = json.loads(out.strip().splitlines()[-1].split("finetune: ", 1)[1])
        print(f"pipeline {stage} {times[stage]:.0f} s", flush=True)
    ours = json.loads((proj / "reports/metrics/evaluate.json").read_text())["test_accuracy"]
    ref = run_reference(a, env, "--fe-aug-epochs", str(args.fe_aug_epochs))
    ours_epoch, ref_epoch = details["mean_epoch_seconds"], ref["finetune_s"] / args.epochs
    once = times["trunk"] + times["finetune"] - ours_epoch * args.epochs
    return [
        f"(a) VGG16 180 px, block5 unfrozen, Flatten head, split per class {args.split}, {args.epochs} fine-tuning "
        f"epochs, finetune.trunk_views={args.views}",
        "| | s / fine-tuning epoch (train + val) | one-off before epoch 1 | test accuracy after the epochs |",
        "|---|---|---|---|",
        f"| pipeline | {ours_epoch:.1f} | {once:.0f} s (trunk stage, validation activations, transplant check) "
        f"| {ours * 100:.1f} % |",
        f"| reference | {ref_epoch:.1f} | {ref.get('fe_aug_s', 0):.0f} s ({args.fe_aug_epochs} epochs feature "
        f"extraction with augmentation) | {ref['final'] * 100:.1f} % |",
        f"epoch speed-up {ref_epoch / ours_epoch:.2f}x (goal >= 3x), accuracy difference "
        f"{(ours - ref['final']) * 100:+.1f} points (goal: no lower than -0.5): "
        f"{'MET' if ref_epoch / ours_epoch >= 3 and (ours - ref['final']) * 100 >= -0.5 else 'NOT MET'}",
    ]


def mobilenet_pipeline(args) -> list[str]:
    a = argparse.Namespace(**{**vars(args), "preset": "mobilenet-offline", "weights": args.mobilenet_weights,
                              "split": args.mobilenet_split,
                              "work": args.work / "mobilenet", "ref_backbone": "mobilenet025", "ref_size": 224,
                              "ref_finetune_epochs": 10})
    proj, env = prepare(a)
    ours, theirs = [], []
    for seed in args.seeds:
        ours.append(run_pipeline(proj, seed, [], env))
        theirs.append(run_reference(a, env))
    o, t = (statistics.mean(r["wall_s"] for r in rows) for rows in (ours, theirs))
    acc_o, acc_t = (statistics.mean(r["final"] for r in rows) * 100 for rows in (ours, theirs))
    return [
        f"(b) MobileNet, whole pipeline (experiment=mobilenet-offline) vs whole reference script, split per class "
        f"{args.mobilenet_split}, seeds {args.seeds}",
        f"pipeline {o:.0f} s, {acc_o:.1f} %; reference {t:.0f} s, {acc_t:.1f} % (fine-tuned); "
        f"speed-up {t / o:.2f}x (goal >= 2.5x): {'MET' if t / o >= 2.5 else 'NOT MET'}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("vgg16_weights")
    ap.add_argument("mobilenet_weights")
    ap.add_argument("reference")
    ap.add_argument("--split", type=int, nargs=3, default=[250, 100, 250], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--mobilenet-split", type=int, nargs=3, default=[500, 150, 400])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--fe-aug-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--only", choices=["vgg16", "mobilenet"])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xfer-speed")
    args = ap.parse_args()
    args.reference = str(Path(args.reference).resolve())
    lines = []
    if args.only != "mobilenet":
        lines += vgg16_epochs(args)
    if args.only != "vgg16":
        lines += ["", *mobilenet_pipeline(args)]
    print("\n" + "\n".join(lines))
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
