"""Benchmark: what the audit finds, on real photos with planted faults, and what it costs.

usage: python bench/audit.py ARCHIVE WEIGHTS [--plant] [--flip 0.02] [--copies 0.04] [--image-size 224]
                             [--out DIR] [--seed 0] [--reflip N] [--again key=value ...]
ARCHIVE: a zip with one folder per class under one top folder (e.g. petimages-dev.zip); WEIGHTS: the Keras
MobileNet v1 (alpha 0.25) notop .h5 (experiment=mobilenet-offline). In a copy of the project under --out: with
--plant, a new archive is written first in which a seeded --flip share of the photos is filed under another class
(``<other>/flip__<class>__<name>``) and a seeded --copies share of the others gets a resized (50-90 %),
re-encoded (JPEG quality 50-85) copy in its own class (``<class>/copy__<name>``); then download, split (fractions
0.6/0.2/0.2), featurize and audit run as `dvc repro` runs them (one process each).
Reports: the audit stage's wall time (process start to end: imports, MLflow, hashing, cross-validation, grids) and
its compute breakdown; with --plant the recall and precision of the planted flips among the flagged files and
within the top k (k = planted flips that reached the split), and the recall of the planted copies that landed in
another split than their original (among the audit's pairs, and among the split's hash-only report).
--reflip N: N more seeded sets of --flip label flips planted on the cached features (a flip changes a label, not
a photo's features: the same as re-planting and re-featurizing), each audited in-process for label errors with the
run's audit params (and the --again overrides): the mean and the range of recall and precision over N plants, not
one draw; the bench's own flips are undone first, copies never flipped. Works without --plant too (e.g. 6 classes).
--again: rerun only the audit of an earlier run (same --out, archive, --plant) with the current code and these
audit overrides (none: the run's params), e.g. --again audit.filter_by=predicted_neq_given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "conf", "stages", "xfer"]


def plant(archive: Path, out: Path, flip: float, copies: float, seed: int) -> dict:
    """Write the planted archive; return what was planted (paths as the manifests will name them)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(archive) as zf:
        entries = [i for i in zf.infolist() if not i.is_dir() and len(Path(i.filename).parts) >= 3
                   and Path(i.filename).suffix.lower() == ".jpg"]
        classes = sorted({Path(i.filename).parts[-2] for i in entries})
        order = rng.permutation(len(entries))
        n_flip, n_copy = round(flip * len(entries)), round(copies * len(entries))
        flips, copied = set(order[:n_flip].tolist()), order[n_flip : n_flip + 3 * n_copy].tolist()
        planted = {"flips": {}, "copies": {}}
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for k, info in enumerate(entries):
                data = zf.read(info)
                *top, cls, name = Path(info.filename).parts
                if k in flips:
                    other = classes[(classes.index(cls) + 1 + int(rng.integers(len(classes) - 1))) % len(classes)]
                    new = f"flip__{cls}__{name}"
                    dst.writestr("/".join([*top, other, new]), data)
                    planted["flips"][f"{other}/{new}"] = cls
                else:
                    dst.writestr(info.filename, data)
            for k in copied:
                if len(planted["copies"]) == n_copy:
                    break
                info = entries[k]
                *top, cls, name = Path(info.filename).parts
                try:
                    with Image.open(io.BytesIO(zf.read(info))) as img:
                        img = img.convert("RGB")
                        scale = rng.uniform(0.5, 0.9)
                        img = img.resize((max(48, round(img.width * scale)), max(48, round(img.height * scale))),
                                         Image.Resampling.LANCZOS)
                        buf = io.BytesIO()
                        img.save(buf, "JPEG", quality=int(rng.integers(50, 86)))
                except OSError:
                    continue  # a blemished file: the download stage drops it anyway
                new = f"copy__{Path(name).stem}.jpg"
                dst.writestr("/".join([*top, cls, new]), buf.getvalue())
                planted["copies"][f"{cls}/{new}"] = f"{cls}/{Path(name).stem}.jpg"
    return planted


def run_stages(proj: Path, stages: list[str], overrides: list[str] = ()) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "XFER_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{proj}/mlruns/mlflow.db", XFER_PIPELINE_ID="bench-audit",
               PYTHONPATH=str(proj))
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *overrides], cwd=proj, env=env,
                              capture_output=True, text=True)
        seconds[stage] = round(time.perf_counter() - start, 1)
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else stage, file=sys.stderr)
        if proc.returncode:
            raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return seconds


def score(proj: Path, planted: dict) -> dict:
    import pandas as pd

    frames = {s: pd.read_csv(proj / f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    where = {p: s for s, f in frames.items() for p in f["path"]}
    report = json.loads((proj / "reports/audit.json").read_text())
    split_report = json.loads((proj / "reports/split.json").read_text())
    flips = {p for p in planted["flips"] if p in where}
    flagged = [d["path"] for d in report["label_issues"]]
    hit = flips & set(flagged)
    top = set(flagged[: len(flips)])
    cross = {frozenset((c, o)) for c, o in planted["copies"].items() if c in where and o in where
             and where[c] != where[o]}
    pairs = {frozenset((p["a"], p["b"])) for p in report["near_duplicates"]}
    hash_pairs = {frozenset((p["a"], p["b"])) for p in split_report.get("cross_split_pairs", [])}
    planted_pairs = {frozenset(x) for x in planted["copies"].items()}
    suggested = {d["path"]: d["suggested"] for d in report["label_issues"]}
    return {
        "planted_flips_in_split": len(flips), "flagged": len(flagged),
        "flip_recall": round(len(hit) / max(len(flips), 1), 3),
        "flip_precision": round(len(hit) / max(len(flagged), 1), 3),
        "flip_recall_top_k": round(len(flips & top) / max(len(flips), 1), 3),
        "flips_with_true_class_suggested": sum(suggested.get(p) == planted["flips"][p] for p in hit),
        "cross_split_planted_copies": len(cross), "copies_found": len(cross & pairs),
        "copy_recall": round(len(cross & pairs) / max(len(cross), 1), 3),
        "copy_recall_split_hash_only": round(len(cross & hash_pairs) / max(len(cross), 1), 3),
        "pairs_flagged": len(pairs), "pairs_not_planted": len(pairs - planted_pairs),
        "pair_precision": round(len(pairs & planted_pairs) / max(len(pairs), 1), 3),
    }


def reflip(proj: Path, planted: dict, n: int, share: float, overrides: list[str]) -> dict:
    """Recall and precision of the label audit over ``n`` seeded flip sets planted on the cached labels."""
    import pandas as pd
    from omegaconf import OmegaConf

    sys.path.insert(0, str(proj))  # the project copy's code, the one that ran the stages
    from xfer.nets.audit import audit

    cfg = OmegaConf.merge(OmegaConf.load(proj / "params.yaml"), OmegaConf.from_dotlist(list(overrides)))
    params = OmegaConf.merge(cfg.audit, {"similarity": 2.0, "outlier_fraction": 0.0})  # label errors only
    classes = json.loads((proj / "data/raw/classes.json").read_text())
    names = ("train", "val", "test")
    frames = {s: pd.read_csv(proj / f"data/splits/{s}.csv") for s in names}
    features = {s: np.load(proj / f"data/features/{cfg.backbone.name}/{s}_features.npy", mmap_mode="r")
                for s in names}
    paths = [p for s in names for p in frames[s]["path"]]
    true = np.concatenate([np.load(proj / f"data/features/{cfg.backbone.name}/{s}_labels.npy") for s in names])
    for i, p in enumerate(paths):  # the bench's own flips undone
        if p in planted["flips"]:
            true[i] = classes.index(planted["flips"][p])
    eligible = np.array([i for i, p in enumerate(paths) if "copy__" not in p and p not in planted["flips"]])
    rows, seconds = [], []
    for k in range(1, n + 1):
        rng = np.random.default_rng(1000 + k)
        flipped = rng.choice(eligible, round(share * len(eligible)), replace=False)
        given = true.copy()
        given[flipped] = (given[flipped] + rng.integers(1, len(classes), len(flipped))) % len(classes)
        start, splits = 0, {}
        for s in names:
            m = len(frames[s])
            splits[s] = {"paths": paths[start : start + m], "labels": given[start : start + m],
                         "features": features[s]}
            start += m
        report, took = audit(splits, classes, params, int(cfg.seed))
        seconds.append(took["label_issues"])
        flagged = {d["path"] for d in report["label_issues"]}
        hit = len(flagged & {paths[i] for i in flipped})
        rows.append((hit / len(flipped), hit / max(len(flagged), 1), len(flagged)))
    a = np.array(rows)
    return {"plants": n, "flips_each": int(round(share * len(eligible))),
            "flip_recall_mean": round(float(a[:, 0].mean()), 3), "flip_recall_min": round(float(a[:, 0].min()), 3),
            "flip_recall_max": round(float(a[:, 0].max()), 3),
            "flip_precision_mean": round(float(a[:, 1].mean()), 3),
            "flip_precision_min": round(float(a[:, 1].min()), 3), "flagged_mean": round(float(a[:, 2].mean()), 1),
            "label_issues_seconds_mean": round(float(np.mean(seconds)), 2)}


def again(work: Path, args) -> None:
    proj = work / "proj"
    for name in ("stages", "xfer"):  # the current code (the params stay the run's)
        shutil.rmtree(proj / name)
        shutil.copytree(ROOT / name, proj / name)
    seconds = run_stages(proj, ["audit"], args.again)
    result = {"archive": args.archive.name, "overrides": args.again, "stage_seconds": seconds,
              "audit": json.loads((proj / "reports/metrics/audit.json").read_text())}
    if args.plant:
        result["planted"] = score(proj, json.loads((work / "planted.json").read_text()))
    if args.reflip:
        planted = json.loads((work / "planted.json").read_text()) if args.plant else {"flips": {}, "copies": {}}
        result["reflipped"] = reflip(proj, planted, args.reflip, args.flip, args.again)
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("weights", type=Path)
    ap.add_argument("--plant", action="store_true")
    ap.add_argument("--flip", type=float, default=0.02)
    ap.add_argument("--copies", type=float, default=0.04)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/xfer-bench-audit"))
    ap.add_argument("--reflip", type=int, default=0)
    ap.add_argument("--again", nargs="*", default=None)
    args = ap.parse_args()
    work = args.out / (args.archive.stem + ("-planted" if args.plant else ""))
    if args.again is not None:
        again(work, args)
        return
    shutil.rmtree(work, ignore_errors=True)
    proj = work / "proj"
    proj.mkdir(parents=True)
    for name in PROJECT_FILES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, proj / name)
    (proj / "weights/mobilenet").mkdir(parents=True)
    shutil.copy2(args.weights, proj / "weights/mobilenet/mobilenet_2_5_224_tf_no_top.h5")
    (proj / "mlruns").mkdir()
    archive, planted = args.archive.resolve(), {"flips": {}, "copies": {}}
    if args.plant:
        archive = work / f"{args.archive.stem}-planted.zip"
        planted = plant(args.archive, archive, args.flip, args.copies, args.seed)
        (work / "planted.json").write_text(json.dumps(planted, indent=1))
    overrides = ["experiment=mobilenet-offline", "data=archive", f"data.url={archive}",
                 f"backbone.image_size={args.image_size}", "split.train=0.6", "split.val=0.2", "split.test=0.2"]
    subprocess.run([sys.executable, "-m", "xfer", "params", *overrides], cwd=proj, check=True,
                   env={**os.environ, "PYTHONPATH": str(proj)}, capture_output=True)
    seconds = run_stages(proj, ["download", "split", "featurize", "audit"])
    metrics = json.loads((proj / "reports/metrics/audit.json").read_text())
    result = {"archive": args.archive.name, "image_size": args.image_size, "stage_seconds": seconds,
              "audit_stage_seconds": json.loads((proj / "reports/runs/audit.json").read_text())["seconds"],
              "audit": metrics, "split_cross_split_hash_pairs":
                  json.loads((proj / "reports/split.json").read_text())["cross_split_near_duplicates"]}
    if args.plant:
        result["planted"] = score(proj, planted)
    if args.reflip:
        result["reflipped"] = reflip(proj, planted, args.reflip, args.flip, [])
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
