"""Views stage: K augmented views of every training image through the frozen backbone, cached like the features,
so that the head learns from augmented data at feature-extraction cost (the book's "feature extraction with
augmentation" without running the backbone every epoch). K = featurize.train_views; with 0 (the default) the
stage writes an empty cache at once, without loading TensorFlow.

The augmentation is fine-tuning's (finetune.augment layers, seeded); the mechanism is xfer.nets.views, shared with the
trunk stage. Outputs data/views/<backbone>/: train_features.npy (K x n rows: view v of image i at row v * n + i),
train_labels.npy, train_paths.txt, meta.json. Validation and test features stay un-augmented (featurize).
"""

from __future__ import annotations

from omegaconf import DictConfig

from xfer.core.config import run_cli
from xfer.core.files import atomic_dir, write_json
from xfer.data.paths import views_dir
from xfer.nets.views import cache_training_views, check_views
from xfer.track.runs import stage_run


def main(cfg: DictConfig) -> None:
    k = check_views("featurize.train_views", cfg.featurize.train_views)
    name = cfg.backbone.name
    with stage_run("views", cfg, ["featurize.train_views", "finetune.augment", "seed"]):
        meta = {"backbone": name, "views": k, "images": 0}
        with atomic_dir(views_dir(name)) as tmp:
            if k:
                from xfer.core.quiet import import_tensorflow
                from xfer.core.runtime import seed_everything
                from xfer.nets.backbones import cached_base

                import_tensorflow()
                seed_everything(cfg.seed, cfg.runtime.deterministic)
                base, fmeta = cached_base(cfg.backbone)
                meta.update(cache_training_views(base, cfg, tmp, k, fmeta["dtype"]))
            write_json(tmp / "meta.json", meta)
    print(f"views: {k} augmented view(s) of {meta['images']} training images" if k else
          "views: featurize.train_views is 0, no augmented views")


if __name__ == "__main__":
    run_cli(main)
