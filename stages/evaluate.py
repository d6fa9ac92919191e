"""Evaluate stage: score the final image model on the test images, and the head alone on the cached test
features for comparison; register the model in MLflow.

Outputs reports/metrics/evaluate.json (the numbers to compare: accuracy, loss, ROC AUC, ECE, macro F1, and the
head alone), reports/evaluate.json (everything: per-class and macro precision/recall/F1, confusion matrix, ...),
reports/plots/{test_predictions,roc}.csv, reports/misclassified.png (the most confidently wrong test images) and
reports/correct.png (the most confidently right ones of each class), each image beside its Grad-CAM heatmap.
evaluate.tta: [flip] averages the probabilities of each image and its mirror (test-time augmentation). The final
model is logged as an MLflow pyfunc taking raw images (with the same TTA), registered as `<data.name>-classifier`
(or evaluate.registered_model) with the alias `candidate` moved to the new version.
evaluate.calibrate: temperature fits one temperature on the validation set's probabilities (the same model and TTA)
and applies it to every reported probability, the Grad-CAM titles and the registered model (xfer.nets.calibrate);
models/calibration.json keeps it; test_ece_uncalibrated is the ECE before.
models/test_probabilities.npy keeps the reported test probabilities (float32, in test manifest order, classes in
data/raw/classes.json order): the reference the export stage checks its files against (no Keras pass of its own).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_path, read_json, write_json
from xfer.data.paths import (
    CALIBRATION,
    CLASSES,
    FINAL_MODEL,
    HEAD_MODEL,
    METRICS,
    PLOTS,
    REPORTS,
    TEST_PROBABILITIES,
    image_paths,
    load_features,
    read_manifest,
)
from xfer.track.figures import confusion_figure, log_figure, roc_figure
from xfer.track.metrics import as_matrix, classification_metrics, expected_calibration_error, roc_points
from xfer.track.recorder import log_artifact, log_dict, log_metrics
from xfer.track.runs import log_inputs, stage_run
from xfer.track.store import answers, tracking_uri

MISCLASSIFIED, CORRECT = REPORTS / "misclassified.png", REPORTS / "correct.png"
REPORT = REPORTS / "evaluate.json"
# What `dvc metrics show` / `dvc exp show` list; the rest of the report stays in reports/evaluate.json and MLflow.
COMPARED = ("test_accuracy", "test_loss", "test_auc", "test_ece", "test_ece_uncalibrated", "temperature",
            "test_f1_macro", "head_test_accuracy", "head_test_auc", "test_accuracy_without_tta", "test_images_per_sec")


def split_probabilities(predictor, head, cfg: DictConfig, split: str, tta: list[str]) -> dict:
    """Class probabilities of one split as reported: the plain view (the head on the cached features when the
    image model is featurize's base + the head, else the model on the images) averaged with the TTA views."""
    manifest = read_manifest(split)
    y, bs = manifest["label"].to_numpy(), int(cfg.evaluate.batch_size)
    x, _ = load_features(cfg.backbone.name, split)
    head_probs = head.predict(np.asarray(x), batch_size=bs, verbose=0)
    # Without fine-tuning the image model is featurize's base + the head (finetune's transplant check): its
    # plain predictions are the head's on the cached features, so only TTA views need the images.
    exported = not cfg.finetune.enabled
    start, passes = time.perf_counter(), len(tta) + (not exported)
    views = predictor.views_of_files(image_paths(manifest), y, bs, plain=not exported) if passes else []
    seconds = time.perf_counter() - start
    plain = as_matrix(head_probs) if exported else views[0]
    return {"manifest": manifest, "y": y, "head": head_probs, "plain": plain, "passes": passes, "seconds": seconds,
            "probs": np.mean([plain, *views[int(not exported) :]], axis=0)}


def main(cfg: DictConfig) -> None:
    import keras

    from xfer.nets.calibrate import calibrate, check_method, scale
    from xfer.nets.gradcam import explain_images
    from xfer.nets.serving import Predictor, evaluate_tta, register, registered_name

    tta = evaluate_tta(cfg)
    for path in (FINAL_MODEL, HEAD_MODEL):
        if not path.is_file():
            raise XferError(f"{path} not found; run the train_head and finetune stages first")
    method = check_method(cfg.evaluate.get("calibrate", "none"))
    classes = read_json(CLASSES)
    test_manifest = read_manifest("test")
    y = test_manifest["label"].to_numpy()
    name = registered_name(cfg) if cfg.evaluate.register else "not registered"
    with stage_run("evaluate", cfg, ["evaluate", "finetune.enabled"], {"evaluate.registered_model": name}) as run:
        log_inputs(cfg, "test")
        predictor = Predictor.load(FINAL_MODEL, CLASSES, tta)
        head = keras.saving.load_model(str(HEAD_MODEL))
        test = split_probabilities(predictor, head, cfg, "test", tta)
        val = split_probabilities(predictor, head, cfg, "val", tta) if method == "temperature" else None
        temperature = calibrate(method, val["y"] if val else None, val["probs"] if val else None, CALIBRATION)
        raw, probs, plain, passes = test["probs"], scale(test["probs"], temperature), test["plain"], test["passes"]
        head_probs, seconds = test["head"], test["seconds"]
        final = classification_metrics(y, probs, classes)
        head_only = classification_metrics(y, head_probs, classes)
        metrics = {f"test_{k}": v for k, v in final.items()}
        metrics.update({f"head_test_{k}": head_only[k] for k in ("accuracy", "loss", "auc", "ece", "f1_macro")})
        metrics.update(test_ece_uncalibrated=expected_calibration_error(y, raw), temperature=temperature,
                       calibrate=method)
        metrics.update(test_images=len(test_manifest), model_params=int(predictor.model.count_params()), tta=tta,
                       test_image_passes=passes,
                       test_accuracy_without_tta=classification_metrics(y, plain, classes)["accuracy"])
        if passes:
            metrics["test_images_per_sec"] = len(test_manifest) * passes / seconds
        compared = [k for k in COMPARED if k in metrics and (k != "test_accuracy_without_tta" or tta)]
        write_json(REPORT, metrics)
        write_json(METRICS / "evaluate.json", {k: round(float(metrics[k]), 6) for k in compared})
        with atomic_path(TEST_PROBABILITIES) as tmp, open(tmp, "wb") as fh:  # the reference export checks against
            np.save(fh, np.asarray(probs, dtype="<f4"))
        pred = probs.argmax(axis=1)
        with atomic_path(PLOTS / "test_predictions.csv") as tmp:
            pd.DataFrame({"path": test_manifest["path"], "actual": test_manifest["class"],
                          "predicted": [classes[i] for i in pred],
                          "probability": probs.max(axis=1).round(6)}).to_csv(tmp, index=False, lineterminator="\n")
        fpr, tpr = roc_points(y, probs)
        with atomic_path(PLOTS / "roc.csv") as tmp:
            pd.DataFrame({"fpr": fpr.round(6), "tpr": tpr.round(6)}).to_csv(tmp, index=False, lineterminator="\n")
        explain_images(predictor.model, image_paths(test_manifest), y, probs, classes,  # calibrated titles
                       int(cfg.evaluate.misclassified), int(cfg.evaluate.correct_per_class), MISCLASSIFIED, CORRECT)
        log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_dict(metrics, "evaluate.json")
        for artifact in (MISCLASSIFIED, CORRECT, PLOTS / "roc.csv", PLOTS / "test_predictions.csv"):
            log_artifact(str(artifact))
        log_figure(roc_figure(fpr, tpr, final["auc"]), "roc.png", parent=True)
        log_figure(confusion_figure(final["confusion_matrix"], classes), "confusion_matrix.png", parent=True)
        registered = "not registered"
        if cfg.evaluate.register and answers(tracking_uri()):
            registered = register(cfg, run, CLASSES, FINAL_MODEL, metrics, temperature)
        elif cfg.evaluate.register:  # the rest of the run's records wait in the spool; the outputs are kept
            registered = "not registered: the tracking server did not answer (`dvc repro -f evaluate` later)"
    summary = {k: round(float(metrics[k]), 4) for k in compared}
    print(f"evaluate: {json.dumps(summary)}; model {registered}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
