"""Train-head stage: fit the dense head on the cached features; keep the best (lowest val_loss) model. The fit
runs a whole epoch per call of its compiled step (steps_per_execution = batches per epoch: the same updates).

Outputs models/head.keras (byte-reproducible), reports/metrics/head.json (validation metrics of the kept model),
reports/plots/head.csv (per-epoch curves for `dvc plots show`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_path, read_json, write_json
from xfer.data.paths import CLASSES, HEAD_MODEL, METRICS, PLOTS, load_features, load_training_features
from xfer.track.figures import log_figure, training_curves
from xfer.track.recorder import log_artifact, log_metrics, log_param, log_params
from xfer.track.runs import epoch_logger, fit_metrics, log_inputs, stage_run


def main(cfg: DictConfig) -> None:
    import keras

    from xfer.core.distribute import check_loss_scaling, distributed, strategy_for
    from xfer.core.runtime import progress_bar, seed_everything, use_jit, xla_errors
    from xfer.nets.models import fit_head, save_model

    strategy = strategy_for(cfg.runtime.strategy, cfg.runtime.jit)  # first: it may set up TensorFlow's devices
    seed_everything(cfg.seed, cfg.runtime.deterministic)
    h = cfg.head
    if not CLASSES.is_file():
        raise XferError(f"{CLASSES} not found; run the download stage first (dvc repro download)")
    n_classes = len(read_json(CLASSES))
    x_train, y_train, views = load_training_features(cfg.backbone.name)
    x_val, y_val = load_features(cfg.backbone.name, "val")
    with stage_run("train_head", cfg, ["head", "seed", "runtime"]), distributed(strategy, log_params):
        log_inputs(cfg, "train", "val")
        jit = use_jit(cfg.runtime.jit, cfg.runtime.deterministic)
        log_param("jit_used", jit)
        with tempfile.TemporaryDirectory() as tmp, atomic_path(PLOTS / "head.csv") as curves:
            extra = [keras.callbacks.CSVLogger(str(curves)), epoch_logger(), progress_bar("train_head")]
            with xla_errors():
                # a whole epoch per call of the compiled step: the same updates, ~1 call per epoch instead of one
                # per batch (the callbacks are per epoch; the progress bar counts every step, a signal stops the fit
                # after the epoch it arrived in). One batch per call on several replicas: Keras 3.15's multi-step
                # loop fails there ("You must feed a value for placeholder tensor ... while/cond/Placeholder_1").
                per_call = -(-len(x_train) // int(h.batch_size)) if strategy.num_replicas_in_sync == 1 else 1
                model, history = fit_head(x_train, y_train, x_val, y_val, h, n_classes, Path(tmp) / "best.weights.h5",
                                          extra, jit, before_compile=lambda: check_loss_scaling(strategy),
                                          steps_per_execution=per_call)
            save_model(model, HEAD_MODEL)
        val_loss, val_acc = model.evaluate(x_val, y_val, batch_size=int(h.batch_size), verbose=0)
        metrics = {"val_loss": round(float(val_loss), 6), "val_accuracy": round(float(val_acc), 6)}
        write_json(METRICS / "head.json", metrics)
        fit = fit_metrics(history, int(h.epochs))
        log_metrics({**fit, "params": model.count_params(), "train_rows": len(x_train),
                                          "train_views": views})
        log_figure(training_curves(PLOTS / "head.csv", f"head on {cfg.backbone.name} features"), "curves.png")
        log_artifact(str(HEAD_MODEL), artifact_path="head_model")
    print(f"train_head: {json.dumps({**metrics, 'epochs': fit['stopped_epoch']})}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
