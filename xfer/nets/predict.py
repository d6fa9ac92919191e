"""Predict: classify image files with the trained model; write a CSV (path, class, probability).

usage: xfer predict FILE_OR_FOLDER [...] [--model models/model.keras | models:/NAME@candidate | FILE.tflite |
                                         FILE.onnx | SAVED_MODEL_DIR]
                                [--classes data/raw/classes.json] [--out predictions.csv] [--tta flip|none]
                                [--explain]
Unreadable files are listed and skipped. Test-time augmentation follows evaluate.tta in params.yaml unless --tta
is given (a registered MLflow model applies the TTA it was evaluated with). Probabilities are calibrated with the
temperature evaluate fitted: calibration.json beside a .keras model (models/calibration.json), or the registered
model's own. --explain also writes each image with
its Grad-CAM heatmap for the predicted class beside the CSV (<out>_explained/, column `explanation`).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from xfer import XferError
from xfer.core.args import Parser
from xfer.core.files import atomic_dir, atomic_path
from xfer.data.paths import CALIBRATION, CLASSES, FINAL_MODEL

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def collect(targets: list[str]) -> list[Path]:
    """Files named directly, plus image files (by suffix) found under folders."""
    files = []
    for target in map(Path, targets):
        if target.is_dir():
            files += sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif target.is_file():
            files.append(target)
        else:
            raise XferError(f"{target}: no such file or folder")
    return files


def default_tta() -> list[str]:
    """evaluate.tta from params.yaml when run in the project, else none."""
    try:
        from xfer.core.config import load_params

        return list(load_params([]).evaluate.get("tta") or [])
    except Exception:  # noqa: BLE001 - outside the project or an old params.yaml: no TTA
        return []


def load(model: str, classes: str, tta=(), explicit_tta: bool = False, explain: bool = False):
    """A :class:`xfer.nets.serving.Predictor` from a .keras file or an MLflow model URI (with the TTA it was logged
    with), or a :class:`xfer.nets.runtimes.ExportedPredictor` from an exported file."""
    from xfer.nets.runtimes import ExportedPredictor, format_of

    if format_of(model) or model.endswith((".tflite", ".onnx")):
        for option, given in (("--tta", explicit_tta), ("--explain", explain)):
            if given:
                raise XferError(f"{option} does not apply to the exported file {model} (its TTA is built in; "
                                "Grad-CAM needs the .keras model)")
        if not Path(classes).is_file():
            raise XferError(f"{classes} not found; pass --classes (the classes.json of the data it was trained on)")
        import json

        return ExportedPredictor(model, json.loads(Path(classes).read_text()))
    if "://" in model or model.startswith("models:/"):
        import mlflow.pyfunc

        from xfer.track.store import check_server, tracking_uri

        check_server(tracking_uri())
        mlflow.set_tracking_uri(tracking_uri())
        return mlflow.pyfunc.load_model(model).unwrap_python_model().predictor
    from xfer.nets.calibrate import read_temperature
    from xfer.nets.serving import Predictor

    for path in (model, classes):
        if not Path(path).is_file():
            raise XferError(f"{path} not found; run the pipeline first (dvc repro) or pass --model/--classes")
    return Predictor.load(model, classes, tta, read_temperature(Path(model).with_name(CALIBRATION.name)))


def explain(predictor, batch, classes: list[str], folder: Path, names: list[str]) -> list[str]:
    """Write each decoded image blended with its Grad-CAM heatmap for ``classes[i]`` as ``folder/<name>.png``."""
    import numpy as np
    from PIL import Image

    from xfer.nets.gradcam import heatmaps, overlay, split_model

    labels = np.array([predictor.classes.index(c) for c in classes])
    cams = heatmaps(predictor.model, batch, labels, split_model(predictor.model))
    out = []
    for image, cam, name in zip(batch, cams, names, strict=True):
        Image.fromarray(overlay(image, cam)).save(folder / f"{name}.png")
        out.append(str(folder / f"{name}.png"))
    return out


def predict(files: list[Path], predictor, batch: int = 32, explain_to: Path | None = None
            ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Classify readable files in batches; return the predictions and the (path, reason) of skipped files.
    ``explain_to``: a folder for the Grad-CAM overlays (column ``explanation``)."""
    from PIL import Image

    rows, skipped, readable = [], [], []
    for f in files:
        try:
            data = f.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            readable.append((f, data))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            skipped.append((str(f), " ".join(str(exc).split())[:100] or type(exc).__name__))
    for i in range(0, len(readable), batch):
        chunk = readable[i : i + batch]
        images = predictor.decode_all([data for _, data in chunk])  # decoded once, also for the heatmaps
        out = predictor.predict_batch(images)
        frame = pd.DataFrame({"path": [str(f) for f, _ in chunk], "class": out["class"].to_list(),
                              "probability": out["probability"].round(6).to_list()})
        if explain_to is not None:
            names = [f"{i + k:05d}_{f.stem}" for k, (f, _) in enumerate(chunk)]
            frame["explanation"] = explain(predictor, images, frame["class"].to_list(), explain_to, names)
        rows.append(frame)
    columns = ["path", "class", "probability", *(["explanation"] if explain_to is not None else [])]
    frame = pd.concat(rows) if rows else pd.DataFrame(columns=columns)
    return frame.reset_index(drop=True), skipped


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="xfer predict", description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", help="image files or folders")
    ap.add_argument("--model", default=str(FINAL_MODEL),
                    help="a .keras file, an MLflow URI (models:/NAME@candidate) or an exported .tflite/.onnx file or "
                    "SavedModel folder")
    ap.add_argument("--classes", default=str(CLASSES), help="class names JSON (for a .keras or exported model)")
    ap.add_argument("--out", default="predictions.csv")
    ap.add_argument("--tta", choices=["flip", "none"], default=None,
                    help="average with the mirrored image (default: evaluate.tta of params.yaml)")
    ap.add_argument("--explain", action="store_true",
                    help="write each image with its Grad-CAM heatmap into <out>_explained/")
    args = ap.parse_args(argv)
    tta = default_tta() if args.tta is None else ([] if args.tta == "none" else [args.tta])
    folder = Path(args.out).with_name(f"{Path(args.out).stem}_explained") if args.explain else None
    try:
        files = collect(args.targets)
        predictor = load(args.model, args.classes, tta, args.tta is not None, args.explain)
        with atomic_dir(folder) if folder else contextlib.nullcontext() as tmp_folder:
            frame, skipped = predict(files, predictor, explain_to=tmp_folder)
            if folder:
                frame["explanation"] = [str(folder / Path(p).name) for p in frame["explanation"]]
            with atomic_path(args.out) as tmp:
                frame.to_csv(tmp, index=False, lineterminator="\n")
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    counts = ", ".join(f"{c} {n}" for c, n in sorted(Counter(frame["class"]).items()))
    print(f"predict: {len(frame)} images ({counts or 'none'}), {len(skipped)} skipped -> {args.out}"
          + (f", heatmaps in {folder}/" if folder else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
