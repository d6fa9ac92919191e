"""Trunk stage: K augmented views of every training image at the fine-tuning boundary (the activations that
enter backbone.unfreeze_from), cached, so that fine-tuning trains the top of the backbone and the head on them
(one view per image per epoch) instead of running the frozen trunk on every image every epoch.
K = finetune.trunk_views; with 0 fine-tuning trains on images, and the stage (like with finetune.enabled=false)
writes an empty cache at once, without loading TensorFlow.

Same mechanism as the views stage (xfer.nets.views: finetune.augment layers, seeded), stored as float16.
Outputs data/trunk/<backbone>/: train_features.npy (K x n rows), train_labels.npy, train_paths.txt, meta.json.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from xfer.core.config import run_cli
from xfer.core.files import atomic_dir, write_json
from xfer.data.paths import trunk_dir
from xfer.nets.views import cache_training_views, check_views
from xfer.track.runs import stage_run


def main(cfg: DictConfig) -> None:
    k = check_views("finetune.trunk_views", cfg.finetune.trunk_views) if cfg.finetune.enabled else 0
    name, boundary = cfg.backbone.name, cfg.backbone.unfreeze_from
    with stage_run("trunk", cfg, ["finetune.trunk_views", "finetune.enabled", "finetune.augment",
                                  "backbone.unfreeze_from", "seed"]):
        meta = {"backbone": name, "boundary": boundary, "views": k, "images": 0}
        with atomic_dir(trunk_dir(name)) as tmp:
            if k:
                from xfer.core.quiet import import_tensorflow
                from xfer.core.runtime import seed_everything
                from xfer.nets.backbones import backbone_cnn, cached_base, unfreeze_from
                from xfer.nets.boundary import split_base

                import_tensorflow()
                seed_everything(cfg.seed, cfg.runtime.deterministic)
                base, _ = cached_base(cfg.backbone)
                unfreeze_from(backbone_cnn(base), boundary)  # checks the layer name
                parts = split_base(base, boundary)
                if parts is None:  # fine-tuning then trains on images, as with trunk_views=0
                    meta.update(views=0, uncuttable=True)
                    k = 0
                    print(f"trunk: backbone.unfreeze_from={boundary} cannot be cached (a connection bypasses it, "
                          "e.g. a residual or a multi-branch block); fine-tuning will train on images",
                          file=sys.stderr)
                else:
                    meta.update(cache_training_views(parts[0], cfg, tmp, k, "float16"))
            write_json(tmp / "meta.json", meta)
    print(f"trunk: {k} augmented view(s) of {meta['images']} training images at {boundary}" if k else
          "trunk: no views, fine-tuning trains on images" if cfg.finetune.enabled else
          "trunk: finetune.enabled is false, nothing to cache")


if __name__ == "__main__":
    run_cli(main)
