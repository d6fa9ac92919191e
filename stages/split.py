"""Split stage: stratified, seeded train/val/test manifests of data/raw/images.

Sizes per class are counts (integers) or fractions (floats in (0, 1)). The user's verdicts come first
(split.exclude, split.relabel: xfer/data/curate.py). Exact duplicates (same sha256) are collapsed to one image
before splitting, so no picture is in two splits; an image found under two classes is dropped. Near-duplicates
(perceptual hash, split.near_duplicates: report | drop | keep) are listed when they straddle splits, or collapsed
before splitting. Outputs data/splits/{train,val,test}.csv with the relative path, label index, class name and
sha256 of each image, and reports/split.json (counts, duplicates, near-duplicates, verdicts applied).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from sklearn.utils import shuffle

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_dir, read_json, write_json
from xfer.data.curate import MODES, apply_verdicts, collapse_near_duplicates, cross_split_pairs
from xfer.data.hashes import dhashes
from xfer.data.paths import CLASSES, IMAGES, REPORTS, SPLIT_NAMES, SPLITS
from xfer.track.recorder import log_metrics
from xfer.track.runs import log_inputs, stage_run


def list_images() -> pd.DataFrame:
    """Every image under data/raw/images with its label and sha256, in a stable order."""
    if not CLASSES.is_file():
        raise XferError(f"{CLASSES} not found; run the download stage first (dvc repro download)")
    classes = read_json(CLASSES)
    rows = []
    for label, cls in enumerate(classes):
        for path in sorted((IMAGES / cls).glob("*.jpg")):
            rows.append({"path": path.relative_to(IMAGES).as_posix(), "label": label, "class": cls,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return pd.DataFrame(rows, columns=["path", "label", "class", "sha256"])


def drop_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Keep the first (by path) of each set of identical files; drop files whose copies disagree on the class."""
    dropped = []
    keep = pd.Series(True, index=df.index)
    for _, group in df[df.duplicated("sha256", keep=False)].groupby("sha256", sort=True):
        group = group.sort_values("path")
        if group["class"].nunique() > 1:
            keep[group.index] = False
            reason = f"same image under classes {', '.join(sorted(set(group['class'])))}"
            dropped += [{"path": p, "reason": reason} for p in group["path"]]
        else:
            keep[group.index[1:]] = False
            dropped += [{"path": p, "reason": f"duplicate of {group['path'].iloc[0]}"} for p in group["path"][1:]]
    return df[keep].reset_index(drop=True), dropped


def split_frame(df: pd.DataFrame, sizes: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified split by per-class counts (ints) or fractions (floats)."""
    values = [sizes[s] for s in SPLIT_NAMES]
    if all(isinstance(v, int) and v > 0 for v in values):
        parts = {s: [] for s in SPLIT_NAMES}
        for cls, group in df.groupby("class", sort=True):
            need = sum(values)
            if len(group) < need:
                raise XferError(f"split: class '{cls}' has {len(group)} images but train+val+test asks for "
                                f"{need}; lower split.train/val/test or use fractions")
            group = shuffle(group, random_state=seed)
            start = 0
            for name, n in zip(SPLIT_NAMES, values, strict=True):
                parts[name].append(group.iloc[start : start + n])
                start += n
        return {s: pd.concat(p).sort_values("path").reset_index(drop=True) for s, p in parts.items()}
    if all(isinstance(v, float) and 0 < v < 1 for v in values) and sum(values) <= 1 + 1e-9:
        tr, va, te = values
        need = int(np.ceil(1 / min(values) - 1e-9))
        counts = df["class"].value_counts().sort_index()
        if len(counts) and counts.min() < max(need, 3):
            raise XferError(f"split: class '{counts.idxmin()}' has {counts.min()} images; fractions need at least "
                            f"{max(need, 3)} per class (one per split at {min(values):g}); add images or drop it")
        train, rest = train_test_split(df, train_size=tr, test_size=min(va + te, 1 - tr),
                                       stratify=df["label"], random_state=seed)
        val, test = train_test_split(rest, train_size=va / (va + te), stratify=rest["label"], random_state=seed)
        out = {"train": train, "val": val, "test": test}
        return {s: f.sort_values("path").reset_index(drop=True) for s, f in out.items()}
    raise XferError("split: train/val/test must be all positive integers (per class) or all fractions in "
                    f"(0, 1) summing to at most 1; got {values}")


def main(cfg: DictConfig) -> None:
    sp = cfg.split
    mode = str(sp.get("near_duplicates", "report"))
    if mode not in MODES:
        raise XferError(f"split.near_duplicates: '{mode}' is not one of {', '.join(MODES)}")
    with stage_run("split", cfg, ["split", "seed"]):
        images, classes = list_images(), read_json(CLASSES)
        images, verdicts = apply_verdicts(images, sp.get("exclude"), sp.get("relabel"), classes)
        df, duplicates = drop_duplicates(images)
        near, mixed, pairs = [], [], []
        if mode != "keep":
            df["dhash"] = list(dhashes(image_paths(df)))
            if mode == "drop":
                df, near, mixed = collapse_near_duplicates(df, int(sp.hash_distance))
        parts = split_frame(df, {s: sp[s] for s in SPLIT_NAMES}, int(cfg.seed))
        if mode == "report":
            pairs = cross_split_pairs(parts, int(sp.hash_distance))
        with atomic_dir(SPLITS) as tmp:
            for name, frame in parts.items():
                frame.drop(columns="dhash", errors="ignore").to_csv(tmp / f"{name}.csv", index=False,
                                                                   lineterminator="\n")
        report = {name: frame["class"].value_counts().sort_index().to_dict() for name, frame in parts.items()}
        report.update(duplicates_dropped=len(duplicates), duplicates=duplicates, near_duplicates_mode=mode,
                      near_duplicates_dropped=len(near), near_duplicates=near, near_duplicates_across_classes=mixed,
                      cross_split_near_duplicates=len(pairs), cross_split_pairs=pairs, verdicts=verdicts)
        write_json(REPORTS / "split.json", report)

        log_metrics({f"{name}_images": len(frame) for name, frame in parts.items()})
        log_metrics({"duplicates_dropped": len(duplicates), "near_duplicates_dropped": len(near),
                     "cross_split_near_duplicates": len(pairs), "verdicts_applied": len(verdicts)})
        log_inputs(cfg, *parts)
    print("split: " + ", ".join(f"{n} {len(f)}" for n, f in parts.items())
          + f" ({len(duplicates)} duplicate files dropped"
          + (f", {len(near)} near-duplicates dropped" if mode == "drop" else "")
          + (f", {len(verdicts)} files excluded or relabelled by params" if verdicts else "") + ")")
    if pairs:
        print(f"split: {len(pairs)} near-duplicate pairs straddle splits (reports/split.json); "
              "split.near_duplicates=drop keeps one of each")


def image_paths(df: pd.DataFrame) -> list[str]:
    return [str(IMAGES / p) for p in df["path"]]


if __name__ == "__main__":
    run_cli(main)
