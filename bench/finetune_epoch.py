"""Benchmark: wall time of one fine-tuning epoch (VGG16, 180 px, block5 unfrozen, default augmentation) on
2,000 images plus a validation pass over 1,000, to choose CPU-sane defaults for finetune.epochs/patience.

usage: python bench/finetune_epoch.py [--train 2000] [--val 1000] [--size 180] [--backbone vgg16] [--deterministic]
Images are generated JPEGs (weights=None: speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--size", type=int, default=180)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--deterministic", action="store_true", help="TensorFlow op determinism (runtime.deterministic)")
    args = ap.parse_args()

    import keras

    from xfer.core.runtime import seed_everything

    seed_everything(0, args.deterministic)

    from stages.finetune import unfreeze_top
    from xfer.data.images import image_dataset, synthetic_image
    from xfer.nets.backbones import build_base
    from xfer.nets.models import augmentation, build_head, compile_model

    bcfg = OmegaConf.load(ROOT / "conf/backbone" / f"{args.backbone}.yaml")
    bcfg.weights, bcfg.image_size = None, args.size
    fcfg = OmegaConf.load(ROOT / "conf/finetune/default.yaml")
    hcfg = OmegaConf.load(ROOT / "conf/head/flatten.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths, labels = [], []
        for i in range(args.train + args.val):
            p = Path(tmp) / f"{i}.jpg"
            synthetic_image(i % 2, 256, rng).save(p, quality=90)
            paths.append(str(p))
            labels.append(i % 2)
        labels = np.array(labels)
        base = build_base(bcfg)
        head = build_head(base.output_shape[1:], 2, hcfg)
        inputs = keras.Input((args.size, args.size, 3))
        model = keras.Model(inputs, head(base(augmentation(fcfg.augment, 0)(inputs), training=False)))
        unfrozen = unfreeze_top(base, bcfg.unfreeze_from)
        compile_model(model, fcfg, 2)
        ds_train = image_dataset(paths[: args.train], labels[: args.train], args.size, args.batch_size, 0)
        ds_val = image_dataset(paths[args.train :], labels[args.train :], args.size, args.batch_size)
        t0 = time.perf_counter()
        model.fit(ds_train, epochs=1, verbose=0)
        t1 = time.perf_counter()
        model.evaluate(ds_val, verbose=0)
        t2 = time.perf_counter()
    print(f"{args.backbone} {args.size}px, {unfrozen} layers unfrozen from {bcfg.unfreeze_from}, "
          f"batch {args.batch_size}, deterministic={args.deterministic}")
    print(f"train epoch  {args.train} images: {t1 - t0:.0f} s ({args.train / (t1 - t0):.1f} img/s)")
    print(f"validation   {args.val} images: {t2 - t1:.0f} s")
    print(f"epoch total  {t2 - t0:.1f} s = {(t2 - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
