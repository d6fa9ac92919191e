"""Evaluate stage: score the final image model on the test images, and the head alone on the cached test
features for comparison; register the model in MLflow.

Outputs reports/metrics/evaluate.json (the numbers to compare: accuracy, loss, ROC AUC, ECE, macro F1, and the
head alone), reports/evaluate.json (everything: per-class and macro precision/recall/F1, confusion matrix, ...),
reports/plots/{test_predictions,roc}.csv and
reports/misclassified.png (the most confidently wrong test images). The final model is logged as an MLflow
pyfunc taking raw images, registered as `<data.name>-classifier` (or evaluate.registered_model) with the alias
`candidate` moved to the new version.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from xfer import XferError
from xfer.config import run_cli
from xfer.data import (
    CLASSES,
    FINAL_MODEL,
    HEAD_MODEL,
    METRICS,
    PLOTS,
    REPORTS,
    image_paths,
    load_features,
    read_manifest,
)
from xfer.files import atomic_path, read_json, write_json
from xfer.metrics import classification_metrics, roc_points
from xfer.tracking import pipeline_id, retry_locked, stage_run

MISCLASSIFIED = REPORTS / "misclassified.png"
REPORT = REPORTS / "evaluate.json"
# What `dvc metrics show` / `dvc exp show` list; the rest of the report stays in reports/evaluate.json and MLflow.
COMPARED = ("test_accuracy", "test_loss", "test_auc", "test_ece", "test_f1_macro", "head_test_accuracy",
            "head_test_auc", "test_images_per_sec")


def misclassified_grid(paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str], n: int,
                       out) -> int:
    """Save a grid of the ``n`` most confidently wrong images (true / predicted class and probability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = [i for i in np.argsort(-conf) if pred[i] != y[i]][:n]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        with Image.open(paths[i]) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred[i]]} ({conf[i]:.2f})", fontsize=9)
    if not wrong:
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return len(wrong)


def register(cfg: DictConfig, run_id: str, classes_path, model_path) -> str:
    """Log the pyfunc (raw images in) and register it; move the `candidate` alias to the new version."""
    import keras
    import mlflow
    import tensorflow as tf

    from xfer.serving import ImageClassifier, signature

    name = cfg.evaluate.registered_model or f"{cfg.data.name}-classifier"
    info = retry_locked(
        mlflow.pyfunc.log_model,
        name="model", python_model=ImageClassifier(), signature=signature(),
        artifacts={"keras_model": str(model_path), "classes": str(classes_path)}, code_paths=["xfer"],
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                          f"mlflow=={mlflow.__version__}", "pillow", "pandas", "omegaconf", "scikit-learn"],
    )
    client = mlflow.MlflowClient()
    chatter = io.StringIO()  # register_model prints "Successfully registered ..." / "Created version ..."
    with contextlib.redirect_stderr(chatter):
        version = retry_locked(mlflow.register_model, info.model_uri, name).version
    for line in chatter.getvalue().splitlines():
        if not line.startswith(("Successfully registered model", "Created version", "Registered model")):
            print(line, file=sys.stderr)
    for key, value in {"run_id": run_id, "backbone": cfg.backbone.name, "pipeline_id": pipeline_id()}.items():
        retry_locked(client.set_model_version_tag, name, version, key, value)
    retry_locked(client.set_registered_model_alias, name, "candidate", version)
    return f"models:/{name}@candidate (version {version})"


def main(cfg: DictConfig) -> None:
    import keras
    import mlflow

    from xfer.images import image_dataset
    from xfer.serving import Predictor

    for path in (FINAL_MODEL, HEAD_MODEL):
        if not path.is_file():
            raise XferError(f"{path} not found; run the train_head and finetune stages first")
    classes = read_json(CLASSES)
    test = read_manifest("test")
    y = test["label"].to_numpy()
    bs = int(cfg.evaluate.batch_size)
    with stage_run("evaluate", cfg, ["evaluate"]) as run:
        predictor = Predictor.load(FINAL_MODEL, CLASSES)
        start = time.perf_counter()
        ds = image_dataset(image_paths(test), y, int(cfg.backbone.image_size), bs)
        probs = np.concatenate([predictor.probabilities(x.numpy()) for x, _ in ds])
        seconds = time.perf_counter() - start
        head = keras.saving.load_model(str(HEAD_MODEL))
        x_test, _ = load_features(cfg.backbone.name, "test")
        head_probs = head.predict(np.asarray(x_test), batch_size=bs, verbose=0)
        final = classification_metrics(y, probs, classes)
        head_only = classification_metrics(y, head_probs, classes)
        metrics = {f"test_{k}": v for k, v in final.items()}
        metrics.update({f"head_test_{k}": head_only[k] for k in ("accuracy", "loss", "auc", "ece")})
        metrics.update(test_images=len(test), model_params=int(predictor.model.count_params()),
                       test_images_per_sec=len(test) / seconds)
        write_json(REPORT, metrics)
        write_json(METRICS / "evaluate.json", {k: round(float(metrics[k]), 6) for k in COMPARED})
        pred = probs.argmax(axis=1)
        with atomic_path(PLOTS / "test_predictions.csv") as tmp:
            pd.DataFrame({"path": test["path"], "actual": test["class"], "predicted": [classes[i] for i in pred],
                          "probability": probs.max(axis=1).round(6)}).to_csv(tmp, index=False, lineterminator="\n")
        fpr, tpr = roc_points(y, probs)
        with atomic_path(PLOTS / "roc.csv") as tmp:
            pd.DataFrame({"fpr": fpr.round(6), "tpr": tpr.round(6)}).to_csv(tmp, index=False, lineterminator="\n")
        with atomic_path(MISCLASSIFIED) as tmp:
            misclassified_grid(image_paths(test), y, probs, classes, int(cfg.evaluate.misclassified), tmp)
        retry_locked(mlflow.log_metrics, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        retry_locked(mlflow.log_dict, metrics, "evaluate.json")
        for artifact in (MISCLASSIFIED, PLOTS / "roc.csv", PLOTS / "test_predictions.csv"):
            retry_locked(mlflow.log_artifact, str(artifact))
        registered = register(cfg, run.info.run_id, CLASSES, FINAL_MODEL) if cfg.evaluate.register else "not registered"
    summary = {k: round(float(metrics[k]), 4) for k in COMPARED}
    print(f"evaluate: {json.dumps(summary)}; model {registered}")


if __name__ == "__main__":
    run_cli(main, tensorflow=True)
