"""Featurize stage: run the frozen backbone once over every split and cache its features as .npy.

Outputs data/features/<backbone>/: <split>_features.npy (feature maps, or vectors with featurize.pooling),
<split>_labels.npy, <split>_paths.txt (same order as the rows), base.weights.h5 (the exact backbone weights
used), meta.json (shapes, pooling, dtype, weights sha256: nothing run-specific, so an identical rerun gives
identical bytes). Images/s go to reports/metrics/featurize.json and MLflow. Features are streamed batch by batch
into memory-mapped .npy files, so memory does not grow with the number of images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_dir, write_json
from xfer.data.fetch import sha256_of
from xfer.data.paths import METRICS, SPLIT_NAMES, feature_dir, image_paths, read_manifest
from xfer.nets.features import BASE_WEIGHTS, DTYPES, featurize_split
from xfer.track.recorder import log_metric, log_metrics, log_param, log_params, set_tag
from xfer.track.runs import log_inputs, stage_run


def weights_sha256(weights: str | None) -> str | None:
    """sha256 of a weights file given by path (None for imagenet / random); build_base has checked it exists."""
    return None if weights in (None, "imagenet") else sha256_of(Path(weights))


def main(cfg: DictConfig) -> None:

    from xfer.core.distribute import distributed, strategy_for
    from xfer.core.runtime import seed_everything, set_jit, use_jit
    from xfer.nets.backbones import backbone_cnn, build_base, set_precision

    strategy = strategy_for(cfg.runtime.strategy, cfg.runtime.jit)  # first: it may set up TensorFlow's devices
    seed_everything(cfg.seed, cfg.runtime.deterministic)
    b, f = cfg.backbone, cfg.featurize
    if f.dtype not in DTYPES:
        raise XferError(f"featurize.dtype: '{f.dtype}' is not one of {', '.join(DTYPES)}")
    precision = set_precision(cfg.runtime.precision, b.get("precision"))
    with stage_run("featurize", cfg, ["backbone", "featurize", "runtime"]), distributed(strategy, log_params):
        log_param("precision_used", precision)  # what runtime.precision=auto chose
        log_inputs(cfg, *SPLIT_NAMES)
        base = build_base(b, pooling=f.pooling)
        jit = use_jit(cfg.runtime.jit, cfg.runtime.deterministic)
        set_jit(base, jit)
        log_param("jit_used", jit)
        sha = weights_sha256(b.weights)
        meta = {"backbone": b.name, "image_size": int(b.image_size), "feature_shape": list(base.output_shape[1:]),
                "pooling": f.pooling, "dtype": f.dtype, "precision": precision,
                "weights": str(b.weights), "weights_sha256": sha, "splits": {}}
        if sha:
            set_tag("weights_sha256", sha)
        seconds = {}
        with atomic_dir(feature_dir(b.name)) as tmp:
            for split in SPLIT_NAMES:
                manifest = read_manifest(split)
                ips = featurize_split(base, image_paths(manifest), manifest["label"].to_numpy(), tmp, split,
                                      int(f.batch_size), f.dtype)
                meta["splits"][split] = {"images": len(manifest)}
                seconds[split] = len(manifest) / ips
                log_metric(f"{split}_images_per_sec", ips)
            backbone_cnn(base).save_weights(str(tmp / BASE_WEIGHTS))
            write_json(tmp / "meta.json", meta)
        total = sum(v["images"] for v in meta["splits"].values())
        ips = total / sum(seconds.values())
        write_json(METRICS / "featurize.json", {"images_per_sec": round(ips, 1)})
        log_metrics({"feature_size": int(np.prod(base.output_shape[1:])),
                                          "backbone_params": base.count_params(), "images_per_sec": ips})
    print(f"featurize: {b.name} features {tuple(meta['feature_shape'])} for "
          + ", ".join(f"{s} {v['images']}" for s, v in meta["splits"].items()) + f" images at {ips:.1f} img/s")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
