"""Scratch stage: train the from-scratch baseline chosen by ``scratch`` (conf/scratch/) on the split's images and
score it on the test images like evaluate does, so the leaderboard holds it beside the transfer-learning models.

``scratch: none`` (the default) writes empty outputs and starts nothing. Otherwise: models/scratch/<name>.keras
(byte-reproducible; the weights of the best val_loss epoch), reports/metrics/scratch.json (scratch_test_*),
reports/scratch.json (the full report), reports/plots/scratch.csv (per-epoch curves) and reports/scratch/
{misclassified,correct}.png (test images beside their Grad-CAM heatmaps).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xfer.core.config import run_cli
from xfer.core.files import atomic_path, read_json, write_json
from xfer.data.paths import CLASSES, METRICS, MODELS, PLOTS, REPORTS, RUNS, image_paths, read_manifest
from xfer.track.figures import confusion_figure, log_figure, roc_figure, training_curves
from xfer.track.metrics import classification_metrics, roc_points
from xfer.track.recorder import log_artifact, log_dict, log_metrics
from xfer.track.runs import epoch_logger, fit_metrics, log_inputs, stage_run
from xfer.track.summary import scratch_digest

OUT_MODELS, OUT_IMAGES = MODELS / "scratch", REPORTS / "scratch"
REPORT, CURVES = REPORTS / "scratch.json", PLOTS / "scratch.csv"
# What `dvc exp show` lists; prefixed so that they stand beside evaluate's test_* columns.
COMPARED = ("test_accuracy", "test_loss", "test_auc", "test_ece", "test_f1_macro")


def fresh_dir(path: Path) -> None:
    """An empty folder at ``path`` (its previous content removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def disabled() -> None:
    for folder in (OUT_MODELS, OUT_IMAGES):
        fresh_dir(folder)
    write_json(METRICS / "scratch.json", {})
    write_json(REPORT, {"scratch": "none"})
    write_json(RUNS / "scratch.json", {"stage": "scratch", "run_id": None})
    with atomic_path(CURVES) as tmp:
        tmp.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n")
    print("scratch: none (no from-scratch baseline; e.g. dvc exp run -S scratch=convnet)")


def main(cfg: DictConfig) -> None:
    s = cfg.scratch
    if s.name == "none":
        return disabled()
    import keras

    from xfer.core.runtime import progress_bar, seed_everything, use_jit, xla_errors
    from xfer.data.images import image_dataset
    from xfer.nets.backbones import set_precision
    from xfer.nets.gradcam import explain_images
    from xfer.nets.models import class_weights, compile_model, save_model, training_callbacks
    from xfer.nets.scratch import build_scratch
    from xfer.nets.serving import Predictor, evaluate_tta

    tta = evaluate_tta(cfg)
    seed_everything(cfg.seed, cfg.runtime.deterministic)
    set_precision(cfg.runtime.precision)
    classes = read_json(CLASSES)
    train, val, test = (read_manifest(split) for split in ("train", "val", "test"))
    size, bs = int(s.image_size), int(s.batch_size)
    with stage_run("scratch", cfg, ["scratch", "seed", "runtime", "evaluate.tta"]) as run:
        log_inputs(cfg, "train", "val", "test")
        model = build_scratch(s, len(classes), int(cfg.seed))
        jit = use_jit(cfg.runtime.jit, cfg.runtime.deterministic)
        compile_model(model, s, len(classes), steps_per_epoch=-(-len(train) // bs), jit=jit)
        train_ds = image_dataset(image_paths(train), train["label"].to_numpy(), size, bs, int(cfg.seed), cache=True)
        val_ds = image_dataset(image_paths(val), val["label"].to_numpy(), size, bs, cache=True)
        with tempfile.TemporaryDirectory() as tmp, atomic_path(CURVES) as curves:
            best = Path(tmp) / "best.weights.h5"
            callbacks = training_callbacks(best, s, [keras.callbacks.CSVLogger(str(curves)), epoch_logger(),
                                                     progress_bar("scratch")])
            with xla_errors():
                history = model.fit(train_ds, validation_data=val_ds, epochs=int(s.epochs), callbacks=callbacks,
                                    verbose=0, shuffle=False,  # the dataset shuffles itself
                                    class_weight=class_weights(train["label"], s.class_weight, len(classes)))
            if best.exists():
                model.load_weights(str(best))
        fresh_dir(OUT_MODELS)
        save_model(model, OUT_MODELS / f"{s.name}.keras")
        # The test images scored as evaluate scores the transfer model: the same TTA views, the same metrics.
        predictor, y = Predictor(model, classes, tta), test["label"].to_numpy()
        views = predictor.views_of_files(image_paths(test), y, bs)
        plain, probs = views[0], np.mean(views, axis=0)
        final = classification_metrics(y, probs, classes)
        report = {f"test_{k}": v for k, v in final.items()}
        report.update(test_images=len(test), model_params=int(model.count_params()), tta=tta,
                      test_accuracy_without_tta=classification_metrics(y, plain, classes)["accuracy"],
                      **fit_metrics(history, int(s.epochs)), inputs_digest=scratch_digest(cfg))
        write_json(REPORT, report)
        write_json(METRICS / "scratch.json", {f"scratch_{k}": round(float(report[k]), 6) for k in COMPARED})
        fresh_dir(OUT_IMAGES)
        explain_images(model, image_paths(test), y, probs, classes, int(cfg.evaluate.misclassified),
                       int(cfg.evaluate.correct_per_class), OUT_IMAGES / "misclassified.png",
                       OUT_IMAGES / "correct.png")
        log_metrics({k: v for k, v in report.items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        log_dict(report, "scratch.json")
        for image in sorted(OUT_IMAGES.glob("*.png")):
            log_artifact(str(image))
        log_figure(training_curves(CURVES, f"{s.name} trained from scratch"), "curves.png")
        log_figure(roc_figure(*roc_points(y, probs), final["auc"]), "roc.png")
        log_figure(confusion_figure(final["confusion_matrix"], classes), "confusion_matrix.png")
        log_artifact(str(OUT_MODELS / f"{s.name}.keras"), artifact_path="keras_model")
        run_id = run.info.run_id
    print(f"scratch: {json.dumps({k: round(float(report[k]), 4) for k in COMPARED})}; "
          f"{report['stopped_epoch']} epochs; run {run_id[:8]}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
