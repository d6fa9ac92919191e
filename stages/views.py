"""Views stage: K augmented views of every training image through the frozen backbone, cached like the features,
so that the head learns from augmented data at feature-extraction cost (the book's "feature extraction with
augmentation" without running the backbone every epoch). K = featurize.train_views; with 0 (the default) the
stage writes an empty cache at once, without loading TensorFlow.

The augmentation is fine-tuning's (finetune.augment layers, seeded). Outputs data/views/<backbone>/:
train_features.npy (K x n rows: view v of image i at row v * n + i), train_labels.npy, train_paths.txt, meta.json.
Validation and test features stay un-augmented (featurize).
"""

from __future__ import annotations

from omegaconf import DictConfig

from xfer import XferError
from xfer.config import run_cli
from xfer.data import image_paths, read_manifest, views_dir
from xfer.features import featurize_split
from xfer.files import atomic_dir, write_json
from xfer.tracking import retry_locked, stage_run


def main(cfg: DictConfig) -> None:
    k = cfg.featurize.train_views
    if not isinstance(k, int) or k < 0:
        raise XferError(f"featurize.train_views: {k!r} is not a whole number >= 0 (augmented views per image)")
    name = cfg.backbone.name
    with stage_run("views", cfg, ["featurize.train_views", "finetune.augment", "seed"]):
        meta = {"backbone": name, "views": k, "images": 0}
        with atomic_dir(views_dir(name)) as tmp:
            if k:
                import mlflow

                from xfer.backbones import cached_base
                from xfer.models import augmentation
                from xfer.runtime import import_tensorflow, seed_everything

                import_tensorflow()
                seed_everything(cfg.seed, cfg.runtime.deterministic)
                base, fmeta = cached_base(cfg.backbone)
                train = read_manifest("train")
                ips = featurize_split(base, image_paths(train), train["label"].to_numpy(), tmp, "train",
                                      int(cfg.featurize.batch_size), fmeta["dtype"],
                                      augment=augmentation(cfg.finetune.augment, int(cfg.seed)), views=k)
                meta["images"] = len(train)
                retry_locked(mlflow.log_metric, "images_per_sec", ips)
            write_json(tmp / "meta.json", meta)
    print(f"views: {k} augmented view(s) of {meta['images']} training images" if k else
          "views: featurize.train_views is 0, no augmented views")


if __name__ == "__main__":
    run_cli(main)
