"""The audit: label errors by out-of-fold probabilities + cleanlab, near-duplicates across splits by features and
perceptual hashes, outliers; the stage's outputs and its place in the parent run."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import tiny_project
from xfer.core.files import read_json
from xfer.nets.audit import audit, label_issues, pooled

PARAMS = OmegaConf.create({"label_splits": ["train", "val", "test"], "folds": 5, "C": 1.0, "similarity": 0.97,
                           "hash_distance": 4, "outlier_fraction": 0.01, "grid": 16, "min_quality": 0.3})


def planted(seed=0, n=300, dim=32, classes=3, flips=12):
    """Gaussian clusters as (n, 2, 2, dim) 'feature maps', split 60/20/20; ``flips`` labels flipped; test rows
    0-4 are copies (plus noise) of train rows 0-4; train row 10 sits far from everything."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    y = np.arange(n) % classes
    x = centres[y][:, None, None, :] + rng.normal(0, 2, (n, 2, 2, dim))
    flipped = rng.choice(np.arange(20, n), flips, replace=False)
    y_given = y.copy()
    y_given[flipped] = (y[flipped] + 1) % classes
    cut = {"train": slice(0, 180), "val": slice(180, 240), "test": slice(240, n)}
    splits = {s: {"paths": [f"img{i:03d}.jpg" for i in range(n)[c]], "labels": y_given[c],
                  "features": x[c].astype(np.float32)} for s, c in cut.items()}
    splits["test"]["features"][:5] = splits["train"]["features"][:5] + rng.normal(0, 0.05, (5, 2, 2, dim))
    splits["test"]["labels"][:5] = splits["train"]["labels"][:5]
    splits["train"]["features"][10] = 40.0
    return splits, {f"img{i:03d}.jpg" for i in flipped}


def test_planted_label_flips_are_found_with_their_true_class():
    splits, flipped = planted()
    report, seconds = audit(splits, ["a", "b", "c"], PARAMS, seed=1)
    flagged = {d["path"] for d in report["label_issues"]}
    assert len(flagged & flipped) >= 0.8 * len(flipped)  # recall
    assert len(flagged & flipped) >= 0.6 * len(flagged)  # precision
    first, quality = report["label_issues"][0], [d["quality"] for d in report["label_issues"]]
    assert first["rank"] == 1 and quality == sorted(quality) and quality[0] < 0.3
    assert all(d["suggested"] != d["label"] for d in report["label_issues"] if d["path"] in flipped)
    assert report["counts"]["label_issues"] == len(flagged) and set(seconds) >= {"label_issues", "near_duplicates"}
    again, _ = audit(splits, ["a", "b", "c"], PARAMS, seed=1)
    assert again["label_issues"] == report["label_issues"]  # seeded folds
    every, _ = audit(splits, ["a", "b", "c"], OmegaConf.merge(PARAMS, {"filter_by": "predicted_neq_given"}), seed=1)
    assert {d["path"] for d in every["label_issues"]} >= flagged & flipped  # every out-of-fold error: a longer list


def test_unsure_flips_confident_learning_misses_are_flagged_by_the_quality_threshold():
    """A weak backbone's held-out model is sure of the clean files (0.97) and only unsure of most flipped ones
    (0.75-0.85 for their true class): confident learning's per-class thresholds (about the classes' mean
    confidence) count only the flips it is sure of; audit.min_quality adds the unsure ones, and nothing clean."""
    rng = np.random.default_rng(0)
    n, y = 400, np.arange(400) % 2
    own = np.full(n, 0.97) - rng.uniform(0, 0.05, n)
    sure, unsure = np.arange(0, 40, 8), np.arange(3, 200, 10)  # 5 sure flips, 20 unsure ones
    own[sure], own[unsure] = rng.uniform(0.01, 0.05, len(sure)), rng.uniform(0.15, 0.25, len(unsure))
    hard = np.arange(201, 400, 20)  # clean but hard: the model is unsure of their (right) label
    own[hard] = rng.uniform(0.4, 0.6, len(hard))
    probs = np.where(np.arange(2) == y[:, None], own[:, None], 1 - own[:, None])
    flips = set(sure) | set(unsure)
    cleanlab_only, quality = label_issues(y, probs, "prune_by_noise_rate", 0.0)
    assert len(set(cleanlab_only) & flips) < 0.5 * len(flips)  # the shortlist misses most unsure flips
    ranked, _ = label_issues(y, probs, "prune_by_noise_rate", 0.3)
    assert set(ranked) >= flips and set(ranked) - flips <= set(cleanlab_only) - flips  # all flips, no new clean file
    assert list(ranked[: len(sure)]) == sorted(sure, key=lambda i: quality[i])  # surest first
    assert np.allclose(quality, own) and set(ranked) == set(cleanlab_only) | set(np.nonzero(own < 0.3)[0])


def test_copies_across_splits_and_the_outlier():
    splits, _ = planted()
    report, _ = audit(splits, ["a", "b", "c"], PARAMS, seed=1)
    pairs = {(p["a"], p["b"]) for p in report["near_duplicates"]}
    assert pairs == {(f"img{i:03d}.jpg", f"img{240 + i:03d}.jpg") for i in range(5)}
    assert all(p["a_split"] == "train" and p["b_split"] == "test" and p["cosine"] >= 0.97
               for p in report["near_duplicates"])
    assert report["outliers"][0]["path"] == "img010.jpg"
    assert pooled(np.ones((2, 3, 3, 4)) * 2).tolist() == [[2.0] * 4] * 2


def test_hashes_add_pairs_the_features_miss():
    splits, _ = planted()
    rng = np.random.default_rng(5)  # random 64-bit hashes: ~32 bits apart
    hashes = {s: rng.integers(0, 256, (len(v["paths"]), 32), dtype=np.uint8) for s, v in splits.items()}
    hashes["val"][3] = hashes["train"][50]
    hashes["val"][3, 0] ^= 0b101  # 2 bits apart
    report, _ = audit(splits, ["a", "b", "c"], PARAMS, seed=1, hashes=hashes)
    pair = [p for p in report["near_duplicates"] if p["a"] == "img050.jpg"]
    assert len(pair) == 1 and pair[0]["b"] == "img183.jpg" and pair[0]["hash_distance"] == 2
    assert pair[0]["cosine"] < 0.97


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """download, split (with a resized, re-encoded copy of a photo), featurize, audit on the tiny set."""
    import importlib

    root_dir = tmp_path_factory.mktemp("audit") / "proj"
    extra = ["split.train=12", "split.val=6", "split.test=8", "data.per_class=26", "featurize.pooling=avg"]
    with tiny_project(root_dir, ["download"], "audit-pipeline", extra) as (root, cfg):
        images = root / "data/raw/images/stripes"
        for i in range(26):  # each stripe photo gets a half-size, re-encoded copy: some land in another split
            with Image.open(images / f"{i:05d}.jpg") as img:
                img.resize((32, 32), Image.Resampling.LANCZOS).save(images / f"copy{i:05d}.jpg", quality=70)
        for stage in ("split", "featurize", "audit"):
            importlib.import_module(f"stages.{stage}").main(cfg)
        yield root, cfg


def test_the_stage_writes_reports_grids_and_metrics(audited):
    root, cfg = audited
    report = read_json(root / "reports/audit.json")
    assert report["enabled"] and set(report) >= {"label_issues", "near_duplicates", "outliers", "counts"}
    split = read_json(root / "reports/split.json")
    straddling = {tuple(sorted((p["a"], p["b"]))) for p in split["cross_split_pairs"]
                  if p["a"].split("/")[1].removeprefix("copy") == p["b"].split("/")[1].removeprefix("copy")}
    found = {tuple(sorted((p["a"], p["b"]))) for p in report["near_duplicates"]}
    assert straddling and straddling <= found
    metrics = read_json(root / "reports/metrics/audit.json")
    assert metrics["near_duplicate_pairs"] == len(report["near_duplicates"]) and "label_issues_seconds" in metrics
    for name in ("audit_label_issues.png", "audit_near_duplicates.png"):
        assert Image.open(root / "reports" / name).format == "PNG"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(read_json(root / "reports/runs/audit.json")["run_id"])
    assert run.data.metrics["near_duplicate_pairs"] == len(report["near_duplicates"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"audit.json", "audit_label_issues.png"}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["audit_near_duplicate_pairs"] == len(report["near_duplicates"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"audit_near_duplicates.png"}


def test_the_audit_is_off_on_request_and_then_costs_nothing(audited, monkeypatch):
    root, cfg = audited
    from stages import audit as stage

    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    off = OmegaConf.merge(cfg, {"audit": {"enabled": False}})
    monkeypatch.setattr(stage, "audit", lambda *a, **k: pytest.fail("audited while off"))
    stage.main(off)
    report = read_json(root / "reports/audit.json")
    assert report["enabled"] is False and report["label_issues"] == [] and read_json(
        root / "reports/metrics/audit.json") == {}


def test_hash_distances_match_a_bit_count_and_flat_images_never_match():
    from xfer.data.hashes import close_pairs, distance

    x = np.random.default_rng(0).integers(0, 256, (40, 32), dtype=np.uint8)
    y = x.copy()
    y[:, 5] ^= 0b11  # 2 bits
    y[7] = x[8]
    assert close_pairs(x, y, 2) == sorted([(i, i, 2) for i in range(40) if i != 7] + [(8, 7, 0)])
    assert distance(x[0], x[1]) == sum(bin(v).count("1") for v in (x[0] ^ x[1]))
    flat = np.zeros((3, 32), np.uint8)
    assert close_pairs(flat, None, 5) == []


def test_a_bad_filter_is_one_line(project):
    from stages.audit import main
    from xfer import XferError
    from xfer.core.config import load_params

    with pytest.raises(XferError, match="audit.filter_by: 'guess' is not one of prune_by_noise_rate"):
        main(load_params(["audit.filter_by=guess"]))
    with pytest.raises(XferError, match=r"audit.min_quality: 0.7 is not in \[0, 0.5\]"):
        main(load_params(["audit.min_quality=0.7"]))
    with pytest.raises(XferError, match="audit.min_quality: high is not in"):
        main(load_params(["audit.min_quality=high"]))
