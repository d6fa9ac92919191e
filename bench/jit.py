"""Benchmark: XLA (`jit_compile=True`) against TensorFlow's default graph execution for the three hot loops,
to choose `runtime.jit`: featurize (the frozen base over images), head training (an epoch on cached features)
and fine-tuning (an epoch of the top + head on cached boundary activations, and one on images).

usage: python bench/jit.py [--backbone mobilenet --size 320] [--images 256] [--rounds 2] [--nondeterministic]
Random weights (speed does not depend on their values) and random inputs; each measurement runs in a fresh
process, off and on alternated, best of --rounds. Prints seconds, on/off ratio, the largest output difference
between the two, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402

TASKS = ("featurize", "head", "finetune_top", "finetune_images")


def measure(task: str, args, jit: bool) -> dict:
    """One task in this process: seconds of the timed pass (after a warm-up that compiles) and its outputs."""
    import keras
    import numpy as np
    from omegaconf import OmegaConf

    from stages.finetune import unfreeze_top
    from xfer.core.runtime import seed_everything, set_jit
    from xfer.nets.backbones import build_base
    from xfer.nets.boundary import split_base
    from xfer.nets.models import augmentation, build_head, compile_model

    seed_everything(0, args.deterministic)
    bcfg = OmegaConf.load(ROOT / "conf/backbone" / f"{args.backbone}.yaml")
    bcfg.weights, bcfg.image_size = None, args.size
    hcfg = OmegaConf.load(ROOT / "conf/head/gap.yaml")
    fcfg = OmegaConf.load(ROOT / "conf/finetune/default.yaml")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.images, args.size, args.size, 3)).astype("float32")
    labels = (np.arange(args.images) % 2).astype("int64")
    base = build_base(bcfg)
    bs = 32
    if task == "featurize":
        set_jit(base, jit)
        base.predict_on_batch(images[:bs])
        start = time.perf_counter()
        out = np.concatenate([base.predict_on_batch(images[i : i + bs]) for i in range(0, len(images), bs)])
        return {"seconds": time.perf_counter() - start, "out": out}
    if task == "head":
        feats = np.concatenate([base.predict_on_batch(images[i : i + bs]) for i in range(0, len(images), bs)])
        feats = np.tile(feats, (8, 1, 1, 1))  # head epochs are short: time 8x the rows
        model = build_head(feats.shape[1:], 2, hcfg)
        compile_model(model, hcfg, 2)
        set_jit(model, jit)
        model.fit(feats[:bs], np.tile(labels, 8)[:bs], epochs=1, batch_size=bs, verbose=0, shuffle=False)
        start = time.perf_counter()
        model.fit(feats, np.tile(labels, 8), epochs=1, batch_size=bs, verbose=0, shuffle=False)
        return {"seconds": time.perf_counter() - start, "out": model.predict(feats[:bs], verbose=0)}
    head = build_head(base.output_shape[1:], 2, hcfg)
    unfreeze_top(base, bcfg.unfreeze_from)
    if task == "finetune_top":
        trunk, top = split_base(base, bcfg.unfreeze_from)
        acts = np.concatenate([trunk.predict_on_batch(images[i : i + bs]) for i in range(0, len(images), bs)])
        inp = keras.Input(acts.shape[1:])
        model, x = keras.Model(inp, head(top(inp, training=False))), acts
    else:
        inp = keras.Input(images.shape[1:])
        model = keras.Model(inp, head(base(augmentation(fcfg.augment, 0)(inp), training=False)))
        x = images
    compile_model(model, fcfg, 2)
    set_jit(model, jit)
    model.fit(x[:bs], labels[:bs], epochs=1, batch_size=bs, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(x, labels, epochs=1, batch_size=bs, verbose=0, shuffle=False)
    return {"seconds": time.perf_counter() - start, "out": model.predict(x[:bs], verbose=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                    help="without TensorFlow op determinism (runtime.deterministic=false); default: with it")
    ap.add_argument("--child", nargs=2, metavar=("TASK", "JIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import numpy as np

        result = measure(args.child[0], args, args.child[1] == "1")
        np.save(Path(args.child[1] + ".npy").resolve(), result["out"])
        print(json.dumps({"seconds": result["seconds"]}))
        return
    import tempfile

    import numpy as np

    print(f"{args.backbone} {args.size}px, {args.images} images, deterministic={args.deterministic}, "
          f"best of {args.rounds}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            best = {}
            for _ in range(args.rounds):
                for jit in ("0", "1"):
                    cmd = [sys.executable, __file__, "--backbone", args.backbone, "--size", str(args.size),
                           "--images", str(args.images), "--child", task, jit,
                           *([] if args.deterministic else ["--nondeterministic"])]
                    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
                    if proc.returncode:
                        print(f"{task} jit={jit}: failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
                        break
                    seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
                    best[jit] = min(best.get(jit, seconds), seconds)
            if len(best) == 2:
                diff = float(np.max(np.abs(np.load(f"{tmp}/0.npy") - np.load(f"{tmp}/1.npy"))))
                print(f"{task:16s} off {best['0']:6.1f} s  on {best['1']:6.1f} s  on/off {best['1'] / best['0']:.2f}"
                      f"  max |diff| {diff:.1e}", flush=True)
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
