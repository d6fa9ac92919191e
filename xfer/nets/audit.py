"""The data audit on cached features: likely label errors, near-duplicates across splits, outliers.

- Label errors: out-of-fold predicted probabilities of a logistic regression on the pooled backbone features
  (k-fold, stratified, seeded). A file is flagged when cleanlab's ``find_label_issues`` (confident learning,
  ``filter_by``) lists it, or when its label quality score is below ``min_quality``: cleanlab's normalized margin
  ``(1 + p(own label) - max p(other class)) / 2`` (0.5: a tie; 0.3: another class is ahead by 0.4; with two
  classes, the held-out model's probability of the file's own label). Confident learning's shortlist is
  precise but, with a weak backbone, misses the flipped photos the held-out model is unsure about; the threshold
  catches those (bench/audit.py, README: Auditing the data). Everything flagged is ranked by that score. A linear
  head on frozen features is what the pipeline's own head is, and it trains k times in seconds on thousands of
  images; the Keras head would take minutes per fold for nearly the same probabilities.
- Near-duplicates: pairs from different splits whose centred pooled features are nearly parallel (cosine) or whose
  perceptual hashes (xfer/data/hashes.py) differ in few bits.
- Outliers: cleanlab's ``OutOfDistribution`` (mean distance to the k nearest neighbours in feature space): the
  least typical files.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1024


def pooled(features: np.ndarray) -> np.ndarray:
    """(n, ..., c) cached features as (n, c) float32 vectors: feature maps averaged over their positions."""
    out = np.empty((len(features), features.shape[-1]), np.float32)
    for start in range(0, len(features), CHUNK):
        block = np.asarray(features[start : start + CHUNK], dtype=np.float32)
        out[start : start + len(block)] = block.reshape(len(block), -1, block.shape[-1]).mean(axis=1)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int,
                              c: float = 1.0) -> np.ndarray:
    """Each row's class probabilities from a logistic regression that never saw it (stratified k-fold; k lowered
    to the smallest class size when a class is smaller)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    k = int(min(folds, np.bincount(y, minlength=n_classes)[np.unique(y)].min()))
    if k < 2:
        raise ValueError("every class needs at least 2 images for cross-validation")
    # tol 1e-3, not 1e-4: half the time, the same ranked issues on the bench's data (bench/audit.py)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500, tol=1e-3))
    # One BLAS thread: these matrices are small, and on a busy 2-core machine threaded BLAS made the same fits 6x
    # slower (28.6 s vs 4.3 s for 5,100 x 256, 6 classes, load average 6.5); also the same floats on any machine.
    with threadpool_limits(limits=1, user_api="blas"):
        probs = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                                  method="predict_proba")
    full = np.zeros((len(x), n_classes))
    full[:, np.unique(y)] = probs  # a class with no image here keeps probability 0
    return full


FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


def label_issues(y: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate",
                 min_quality: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the likely label errors, most likely first, and every row's label quality score (cleanlab's
    normalized margin, in [0, 1]). Flagged: cleanlab's ``filter_by`` list, plus every row whose score is below
    ``min_quality`` (0: cleanlab's list only); ranked by the score (ties: by index)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(y)
    if len(present) < 2:
        return np.zeros(0, dtype=int), np.ones(len(y))
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    p = probs[:, present]
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    quality = np.asarray(get_label_quality_scores(remap[y], p, method="normalized_margin"), float)
    flagged = np.asarray(find_label_issues(remap[y], p, filter_by=filter_by, n_jobs=1), bool) | (quality < min_quality)
    index = np.nonzero(flagged)[0]
    return index[np.argsort(quality[index], kind="stable")], quality


def similar_pairs(a: np.ndarray, b: np.ndarray, min_cosine: float) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` of unit vectors ``a[i]``, ``b[j]`` with cosine >= ``min_cosine``."""
    out = []
    for start in range(0, len(a), CHUNK):
        sim = a[start : start + CHUNK] @ b.T
        for i, j in zip(*np.nonzero(sim >= min_cosine), strict=True):
            out.append((start + int(i), int(j), float(sim[i, j])))
    return out


def outlier_scores(x: np.ndarray, k: int = 10) -> np.ndarray:
    """Typicality in (0, 1] of each row (cleanlab's OutOfDistribution on the features; low = atypical)."""
    from cleanlab.outlier import OutOfDistribution

    k = max(1, min(k, len(x) - 1))
    return np.asarray(OutOfDistribution(params={"k": k}).fit_score(features=x), dtype=float)


def audit(splits: dict[str, dict], classes: list[str], a, seed: int, hashes: dict[str, np.ndarray] | None = None
          ) -> tuple[dict, dict[str, float]]:
    """The whole audit. ``splits``: name -> {"paths": manifest paths, "labels": int array, "features": cached
    features}; ``a``: the ``audit`` params; ``hashes``: name -> dHashes (None: no hash matching). Returns the
    report (every flagged file: score, suggested label) and the seconds each part took."""
    import time

    from xfer.data.hashes import close_pairs, distance

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    raw = {s: pooled(v["features"]) for s, v in splits.items()}
    # Centred on the data set's mean before the cosine: post-ReLU features share a large positive component that
    # makes any two photos look alike (random weights: cosine > 0.97 for nearly every pair).
    mean = np.concatenate(list(raw.values())).mean(axis=0) if any(len(r) for r in raw.values()) else 0.0
    vectors = {s: unit(r - mean) for s, r in raw.items()}
    seconds["pool"] = time.perf_counter() - t

    t = time.perf_counter()
    audited = [s for s in a.label_splits if s in splits and len(splits[s]["paths"])]
    x = np.concatenate([raw[s] for s in audited]) if audited else np.zeros((0, 1), np.float32)
    y = np.concatenate([splits[s]["labels"] for s in audited]).astype(int) if audited else np.zeros(0, int)
    where = [(s, i) for s in audited for i in range(len(splits[s]["paths"]))]
    issues = []
    if len(np.unique(y)) >= 2 and np.bincount(y).max() >= 2:
        probs = out_of_fold_probabilities(x, y, len(classes), int(a.folds), seed, float(a.C))
        ranked, quality = label_issues(y, probs, str(a.get("filter_by", "prune_by_noise_rate")),
                                       float(a.get("min_quality", 0.0)))
        for rank, k in enumerate(ranked):
            s, i = where[k]
            issues.append({"path": splits[s]["paths"][i], "split": s, "label": classes[y[k]],
                           "suggested": classes[int(np.argmax(probs[k]))], "quality": round(float(quality[k]), 4),
                           "self_confidence": round(float(probs[k, y[k]]), 4),
                           "suggested_probability": round(float(probs[k].max()), 4), "rank": rank + 1})
    seconds["label_issues"] = time.perf_counter() - t

    t = time.perf_counter()
    names = [s for s in splits if len(splits[s]["paths"])]
    pairs: dict[tuple, dict] = {}
    for ai, sa in enumerate(names):
        for sb in names[ai + 1 :]:
            for i, j, cos in similar_pairs(vectors[sa], vectors[sb], float(a.similarity)):
                pairs[(sa, i, sb, j)] = {"cosine": round(cos, 4)}
            if hashes is not None:
                for i, j, dist in close_pairs(hashes[sa], hashes[sb], int(a.hash_distance)):
                    pairs.setdefault((sa, i, sb, j), {})["hash_distance"] = dist
    near = []
    for (sa, i, sb, j), found in pairs.items():
        cos = found.get("cosine", round(float(vectors[sa][i] @ vectors[sb][j]), 4))
        dist = found.get("hash_distance")
        if dist is None and hashes is not None:
            dist = distance(hashes[sa][i], hashes[sb][j])
        near.append({"a": splits[sa]["paths"][i], "a_split": sa, "a_label": classes[splits[sa]["labels"][i]],
                     "b": splits[sb]["paths"][j], "b_split": sb, "b_label": classes[splits[sb]["labels"][j]],
                     "cosine": cos, "hash_distance": dist})
    near.sort(key=lambda p: (-p["cosine"], p["a"], p["b"]))
    seconds["near_duplicates"] = time.perf_counter() - t

    t = time.perf_counter()
    outliers = []
    every = [(s, i) for s in names for i in range(len(splits[s]["paths"]))]
    n_out = int(round(float(a.outlier_fraction) * len(every)))
    if n_out and len(every) > 2:
        scores = outlier_scores(np.concatenate([vectors[s] for s in names]))
        for k in np.argsort(scores, kind="stable")[:n_out]:
            s, i = every[k]
            outliers.append({"path": splits[s]["paths"][i], "split": s, "label": classes[splits[s]["labels"][i]],
                             "typicality": round(float(scores[k]), 4)})
    seconds["outliers"] = time.perf_counter() - t
    counts = {"images": len(every), "audited_for_labels": len(y), "label_issues": len(issues),
              "near_duplicate_pairs": len(near),
              "near_duplicate_pairs_other_label": sum(p["a_label"] != p["b_label"] for p in near),
              "outliers": len(outliers)}
    for s in names:
        counts[f"label_issues_{s}"] = sum(d["split"] == s for d in issues)
    return {"counts": counts, "label_issues": issues, "near_duplicates": near, "outliers": outliers}, seconds
