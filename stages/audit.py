"""Audit stage: find likely label errors, near-duplicates across splits and outliers in the cached features.

Reads data/features/<backbone>/ and data/splits/ (never a model: it is not downstream of train_head). Writes
reports/audit.json (every flagged file with its score and suggested label), reports/metrics/audit.json (counts),
the grids reports/audit_label_issues.png and reports/audit_near_duplicates.png (also MLflow figures, in the
pipeline's parent run too). It changes nothing: split.exclude / split.relabel are how a user acts on it.
With audit.enabled=false the outputs say so and cost nothing.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import run_cli
from xfer.core.files import atomic_path, read_json, write_json
from xfer.data.hashes import dhashes
from xfer.data.paths import CLASSES, IMAGES, METRICS, REPORTS, SPLIT_NAMES, load_features, read_manifest
from xfer.nets.audit import FILTERS, audit
from xfer.track.figures import file_grid, log_figure
from xfer.track.recorder import log_artifact, log_metrics
from xfer.track.runs import stage_run
from xfer.track.summary import audit_digest

REPORT, LABEL_GRID, PAIR_GRID = REPORTS / "audit.json", REPORTS / "audit_label_issues.png", \
    REPORTS / "audit_near_duplicates.png"


def grids(report: dict, n: int) -> tuple:
    """The figures: the top ``n`` suspected label errors, and the ``n // 2`` most similar cross-split pairs."""
    issues = report["label_issues"][:n]
    labels = file_grid([IMAGES / d["path"] for d in issues],
                       [f"#{d['rank']} {d['path']}\n{d['label']} -> {d['suggested']}? (p={d['self_confidence']:.2f})"
                        for d in issues], "no likely label errors")
    pairs = report["near_duplicates"][: n // 2]
    paths, titles = [], []
    for p in pairs:
        dist = "" if p["hash_distance"] is None else f", {p['hash_distance']} bits"
        paths += [IMAGES / p["a"], IMAGES / p["b"]]
        titles += [f"{p['a_split']}: {p['a']}", f"{p['b_split']}: {p['b']}\ncos {p['cosine']:.3f}{dist}"]
    return labels, file_grid(paths, titles, "no near-duplicates across splits")


def main(cfg: DictConfig) -> None:
    a = cfg.audit
    if a.filter_by not in FILTERS:
        raise XferError(f"audit.filter_by: '{a.filter_by}' is not one of {', '.join(FILTERS)}")
    try:
        min_quality = float(a.min_quality)
    except (TypeError, ValueError):
        min_quality = -1.0
    if not 0 <= min_quality <= 0.5:
        raise XferError(f"audit.min_quality: {a.min_quality} is not in [0, 0.5] (0.5: every file another class is "
                        "ahead of; 0: cleanlab's list only)")
    with stage_run("audit", cfg, ["audit", "seed"]):
        started = time.perf_counter()
        if a.enabled:
            classes = read_json(CLASSES)
            splits = {}
            for s in SPLIT_NAMES:
                manifest = read_manifest(s)
                x, y = load_features(cfg.backbone.name, s)
                splits[s] = {"paths": list(manifest["path"]), "labels": y, "features": x}
            t = time.perf_counter()
            hashes = {s: dhashes([IMAGES / p for p in v["paths"]]) for s, v in splits.items()} \
                if int(a.hash_distance) >= 0 else None
            hash_seconds = time.perf_counter() - t
            report, seconds = audit(splits, classes, a, int(cfg.seed), hashes)
            seconds["hash"] = hash_seconds
        else:
            report = {"counts": {}, "label_issues": [], "near_duplicates": [], "outliers": []}
            seconds = {}
        report = {"enabled": bool(a.enabled), "inputs_digest": audit_digest(cfg), **report}
        write_json(REPORT, report)
        write_json(METRICS / "audit.json", {**report["counts"],
                                            **{f"{k}_seconds": round(v, 2) for k, v in seconds.items()}})
        for fig, path in zip(grids(report, int(a.grid)), (LABEL_GRID, PAIR_GRID), strict=True):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=80, format="png")
            log_figure(fig, path.name, parent=True)
        log_metrics({**report["counts"], **{f"{k}_seconds": v for k, v in seconds.items()},
                     "audit_seconds": time.perf_counter() - started})
        log_artifact(str(REPORT))
    c = report["counts"]
    print("audit: " + (f"{c['label_issues']} likely label errors (of {c['audited_for_labels']}), "
                       f"{c['near_duplicate_pairs']} near-duplicate pairs across splits, {c['outliers']} outliers "
                       f"in {time.perf_counter() - started:.1f} s; see reports/audit.json" if a.enabled
                       else "off (audit.enabled=false)"))


if __name__ == "__main__":
    run_cli(main)
