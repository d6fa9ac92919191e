"""What the split does with the user's verdicts and with near-duplicates, before and after splitting.

- ``split.exclude`` (paths) and ``split.relabel`` (path -> class), e.g. from reviewing reports/audit.json: the
  files keep their place in data/raw/images, the manifests leave them out or carry the new label.
- ``split.near_duplicates``: ``report`` (default) lists the perceptual-hash near-duplicate pairs that landed in
  different splits; ``drop`` keeps only the first (by path) of each group of near-duplicates of one class before
  splitting (as for byte-identical files), so no two copies can straddle splits and every split still gets the
  asked number per class; a group spanning classes is reported, not resolved (the audit shows it); ``keep``
  neither lists nor drops.
"""

from __future__ import annotations

import pandas as pd

from xfer import XferError
from xfer.data.hashes import close_pairs, groups

MODES = ("report", "drop", "keep")
HINT = "paths as in data/splits/*.csv or reports/audit.json, e.g. {example}"


def relabel_map(value) -> dict[str, str]:
    """``split.relabel`` as path -> class: a list of ``"path:class"`` strings (``-S 'split.relabel=[Dog/1.jpg:Cat]'``;
    split at the last colon) or a mapping written in params.yaml."""
    if not value:
        return {}
    if hasattr(value, "items"):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for item in value:
        path, sep, cls = str(item).rpartition(":")
        if not sep or not path.strip() or not cls.strip():
            raise XferError(f"split.relabel: '{item}' is not 'path:class', e.g. Dog/11702.jpg:Cat")
        out[path.strip()] = cls.strip()
    return out


def apply_verdicts(df: pd.DataFrame, exclude, relabel, classes: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """Leave out the ``exclude`` paths and give the ``relabel`` paths their new class; every path must exist."""
    relabel = relabel_map(relabel)
    known = set(df["path"])
    example = df["path"].iloc[0] if len(df) else "Cat/0.jpg"
    for key, paths in (("split.exclude", list(exclude or [])), ("split.relabel", list((relabel or {}).keys()))):
        for p in paths:
            if str(p) not in known:
                raise XferError(f"{key}: '{p}' is not an image of data/raw/images ({HINT.format(example=example)})")
    changes = []
    df = df.copy()
    for path, cls in (relabel or {}).items():
        if cls not in classes:
            raise XferError(f"split.relabel: '{path}': class '{cls}' is not one of {', '.join(classes)}")
        row = df["path"] == str(path)
        changes.append({"path": str(path), "from": df.loc[row, "class"].iloc[0], "to": str(cls)})
        df.loc[row, ["label", "class"]] = [classes.index(cls), cls]
    excluded = [{"path": str(p), "reason": "split.exclude"} for p in (exclude or [])]
    df = df[~df["path"].isin([str(p) for p in exclude or []])].reset_index(drop=True)
    return df, [*excluded, *({"path": c["path"], "reason": f"relabelled {c['from']} -> {c['to']}"} for c in changes)]


def collapse_near_duplicates(df: pd.DataFrame, max_distance: int) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Keep the first (by path) of each same-class group of near-duplicates (``df`` has a ``dhash`` column);
    return the frame, the files dropped and the groups that span classes (kept)."""
    df = df.sort_values("path").reset_index(drop=True)
    keep = pd.Series(True, index=df.index)
    dropped, mixed = [], []
    for members in groups(len(df), close_pairs(list(df["dhash"]), None, max_distance)):
        group = df.iloc[members]
        if group["class"].nunique() > 1:
            mixed.append({"paths": list(group["path"]), "classes": sorted(set(group["class"]))})
            continue
        keep[group.index[1:]] = False
        dropped += [{"path": p, "reason": f"near-duplicate of {group['path'].iloc[0]}"} for p in group["path"][1:]]
    return df[keep].reset_index(drop=True), dropped, mixed


def cross_split_pairs(parts: dict[str, pd.DataFrame], max_distance: int) -> list[dict]:
    """Near-duplicate pairs whose files are in different splits (earlier split first), with their distance."""
    names = list(parts)
    out = []
    for a_i, a in enumerate(names):
        for b in names[a_i + 1 :]:
            fa, fb = parts[a], parts[b]
            for i, j, dist in close_pairs(list(fa["dhash"]), list(fb["dhash"]), max_distance):
                out.append({"a": fa["path"].iloc[i], "a_split": a, "b": fb["path"].iloc[j], "b_split": b,
                            "hash_distance": dist, "same_class": bool(fa["class"].iloc[i] == fb["class"].iloc[j])})
    return out
