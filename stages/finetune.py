"""Fine-tune stage: backbone + trained head as one image model; unfreeze the top of the backbone and train
it with the head at a low learning rate on augmented images.

The model is input -> augmentation -> the backbone's preprocess_input -> the base with the weights used for
the feature cache (called with training=False, so BatchNorm stays frozen) -> the trained head.
Before training it checks that the assembled model reproduces the head's validation predictions. Each epoch
validates through the trainable top only, on the validation images' activations at backbone.unfreeze_from,
computed once (xfer.nets.boundary; the whole model on images where a residual connection bypasses that layer).
Outputs models/model.keras (byte-reproducible), reports/metrics/finetune.json, reports/plots/finetune.csv.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_path, write_json
from xfer.data.paths import FINAL_MODEL, HEAD_MODEL, METRICS, PLOTS, image_paths, load_features, read_manifest
from xfer.nets.finetune import assemble, compile_finetune, fit_finetune, unfreeze_top
from xfer.track.figures import log_figure, training_curves
from xfer.track.recorder import log_artifact, log_metric, log_metrics, log_param, log_params
from xfer.track.runs import epoch_logger, fit_metrics, log_inputs, stage_run

TRANSPLANT_TOLERANCE = 1e-3


def transplant_check(model, head, cfg: DictConfig) -> float:
    """Max |p_model(images) - p_head(cached features)| on featurize's first batch of validation images (the same
    batch shape, so the same kernels: exact in any precision)."""
    from xfer.core.distribute import predict_on_batch
    from xfer.data.images import image_dataset

    x_val, y_val = load_features(cfg.backbone.name, "val")
    n = bs = int(cfg.featurize.batch_size)
    manifest = read_manifest("val").iloc[:n]
    ds = image_dataset(image_paths(manifest), manifest["label"].to_numpy(), int(cfg.backbone.image_size), bs)
    p_model = np.concatenate([predict_on_batch(model, x) for x, _ in ds])
    p_head = head.predict(np.asarray(x_val[:n]), verbose=0)
    return float(np.max(np.abs(p_model - p_head)))


def main(cfg: DictConfig) -> None:
    import keras

    from xfer.core.distribute import check_loss_scaling, distributed, strategy_for
    from xfer.core.runtime import progress_bar, seed_everything, use_jit, xla_errors
    from xfer.nets.boundary import fit_plan
    from xfer.nets.models import compile_model, save_model

    strategy = strategy_for(cfg.runtime.strategy, cfg.runtime.jit)  # first: it may set up TensorFlow's devices
    seed = int(cfg.seed)
    seed_everything(seed, cfg.runtime.deterministic)
    f = cfg.finetune
    if not HEAD_MODEL.is_file():
        raise XferError(f"{HEAD_MODEL} not found; run the train_head stage first")
    sections = ["finetune", "backbone.unfreeze_from", "seed", "runtime"]
    with stage_run("finetune", cfg, sections), distributed(strategy, log_params):
        head = keras.saving.load_model(str(HEAD_MODEL))  # in the scope: its variables on every replica
        outputs = int(head.output_shape[-1])
        n_classes = 2 if outputs == 1 else outputs
        model, base = assemble(cfg, head, seed)
        log_param("precision_used", keras.mixed_precision.global_policy().compute_dtype)
        log_inputs(cfg, "train", "val")
        diff = transplant_check(model, head, cfg)
        log_metric("transplant_max_abs_diff", diff)
        if diff > TRANSPLANT_TOLERANCE:
            raise XferError(f"assembled model disagrees with the head on cached features (max diff {diff:.2e} > "
                            f"{TRANSPLANT_TOLERANCE}); preprocessing or backbone weights differ from featurize's")
        metrics, details = {}, {"transplant_max_abs_diff": diff}
        with tempfile.TemporaryDirectory() as tmp, atomic_path(PLOTS / "finetune.csv") as curves:
            if f.enabled:
                trainable = unfreeze_top(base, cfg.backbone.unfreeze_from)
                check_loss_scaling(strategy)
                jit = use_jit(cfg.runtime.jit, cfg.runtime.deterministic)
                log_param("jit_used", jit)
                plan = fit_plan(cfg, model, base, head,  # compiles the validation model, after `trainable`
                                lambda m, steps: compile_model(m, f, n_classes, steps_per_epoch=steps, jit=jit))
                compile_finetune(plan.model, f, n_classes, plan.steps, jit)
                timer = epoch_logger()
                extra, best = [keras.callbacks.CSVLogger(str(curves)), timer, progress_bar("finetune")], Path(tmp)
                with xla_errors():  # the data shuffle themselves
                    history = fit_finetune(plan.model, plan.train, plan.val, f, n_classes, best / "best.weights.h5",
                                           read_manifest("train")["label"], plan.first_callbacks, extra)
                if plan.model is not model:  # trained on trunk views: the image model is exported compiled
                    compile_model(model, f, n_classes, steps_per_epoch=1)
                val = plan.evaluate()
                metrics.update({f"val_{k.removeprefix('val_')}": round(float(v), 6) for k, v in val.items()})
                details.update({**fit_metrics(history, int(f.epochs)), "trainable_layers": trainable,
                                "mean_epoch_seconds": round(float(np.mean(timer.seconds)), 2),
                                "trainable_weights": len(plan.model.trainable_weights),
                                "validation_at_boundary": int(plan.at_boundary),
                                "trained_on_trunk_views": int(plan.source == "trunk views")})
            else:
                curves.write_text("epoch,loss,accuracy,val_loss,val_accuracy\n")
                compile_model(model, f, n_classes, steps_per_epoch=1)  # exported only, never trained
            save_model(model, FINAL_MODEL)
        write_json(METRICS / "finetune.json", metrics)
        log_metrics(details)  # the kept model's val_* are the fit's at best_epoch
        if f.enabled:
            log_figure(training_curves(PLOTS / "finetune.csv", f"fine-tuning {cfg.backbone.name}"), "curves.png")
        log_artifact(str(FINAL_MODEL), artifact_path="keras_model")
    print(f"finetune: {json.dumps({**metrics, **details})}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
