"""Split stage: stratified, seeded, counts or fractions, byte-identical reruns, more than two classes."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from xfer import XferError
from xfer.core.config import load_params
from xfer.core.files import write_json


def make_raw(root, counts: dict[str, int]) -> None:
    for ci, (cls, n) in enumerate(counts.items()):
        d = root / "data/raw/images" / cls
        d.mkdir(parents=True)
        for i in range(n):  # every image different
            Image.new("RGB", (40, 40), (i * 5 % 256, ci * 60, 0)).save(d / f"{i:03d}.jpg")
    write_json(root / "data/raw/classes.json", sorted(counts))


def run_split(overrides):
    from stages.split import main

    main(load_params(overrides))
    return {s: pd.read_csv(f"data/splits/{s}.csv") for s in ("train", "val", "test")}


def test_counts_per_class_three_classes(project):
    make_raw(project, {"ant": 30, "bee": 25, "cow": 40})
    parts = run_split(["split.train=10", "split.val=5", "split.test=8"])
    for name, n in [("train", 10), ("val", 5), ("test", 8)]:
        assert parts[name]["class"].value_counts().to_dict() == {"ant": n, "bee": n, "cow": n}
    paths = [set(p["path"]) for p in parts.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert list(parts["train"].columns) == ["path", "label", "class", "sha256"]
    assert set(parts["test"]["label"]) == {0, 1, 2}


def test_same_seed_same_bytes_other_seed_other_split(project):
    make_raw(project, {"cat": 20, "dog": 20})
    run_split(["split.train=8", "split.val=4", "split.test=4"])
    first = (project / "data/splits/train.csv").read_bytes()
    run_split(["split.train=8", "split.val=4", "split.test=4"])
    assert (project / "data/splits/train.csv").read_bytes() == first
    run_split(["split.train=8", "split.val=4", "split.test=4", "seed=7"])
    assert (project / "data/splits/train.csv").read_bytes() != first


def test_fractions_are_stratified(project):
    make_raw(project, {"cat": 40, "dog": 20})
    parts = run_split(["split.train=0.5", "split.val=0.25", "split.test=0.25"])
    assert parts["train"]["class"].value_counts().to_dict() == {"cat": 20, "dog": 10}
    assert sum(len(p) for p in parts.values()) == 60


def test_too_few_images_names_the_class_and_count(project):
    make_raw(project, {"cat": 20, "dog": 9})
    with pytest.raises(XferError, match="class 'dog' has 9 images but train\\+val\\+test asks for 12"):
        run_split(["split.train=6", "split.val=3", "split.test=3"])


def test_exact_duplicates_never_straddle_splits(project):
    make_raw(project, {"cat": 20, "dog": 20})
    img = project / "data/raw/images"
    for i in range(5):  # five copies of one cat photo, and one cat photo also filed under dog
        (img / "cat" / f"copy{i}.jpg").write_bytes((img / "cat/000.jpg").read_bytes())
    (img / "dog" / "stray.jpg").write_bytes((img / "cat/001.jpg").read_bytes())
    parts = run_split(["split.train=0.5", "split.val=0.25", "split.test=0.25"])
    all_rows = pd.concat(parts.values())
    assert all_rows["sha256"].is_unique
    assert "cat/001.jpg" not in set(all_rows["path"]) and "dog/stray.jpg" not in set(all_rows["path"])
    report = __import__("json").loads((project / "reports/split.json").read_text())
    assert report["duplicates_dropped"] == 7
    assert {"path": "cat/copy0.jpg", "reason": "duplicate of cat/000.jpg"} in report["duplicates"]


def make_photos(root, counts: dict[str, int], copies: dict[str, str] | None = None) -> None:
    """Textured images (random blocks, informative hashes); ``copies``: new path -> resized, re-encoded copy of
    an existing one."""
    import numpy as np

    for ci, (cls, n) in enumerate(counts.items()):
        d = root / "data/raw/images" / cls
        d.mkdir(parents=True)
        for i in range(n):
            blocks = np.random.default_rng(1000 * ci + i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((96, 96), Image.Resampling.BILINEAR).save(d / f"{i:03d}.jpg", quality=95)
    for new, old in (copies or {}).items():
        img = Image.open(root / "data/raw/images" / old)
        img.resize((71, 71), Image.Resampling.LANCZOS).save(root / "data/raw/images" / new, quality=60)
    write_json(root / "data/raw/classes.json", sorted(counts))


def test_near_duplicates_straddling_splits_are_reported_then_dropped_on_request(project):
    import json

    from xfer.data.hashes import dhash, distance

    make_photos(project, {"a": 20, "b": 20}, {f"a/copy{i}.jpg": f"a/{i:03d}.jpg" for i in range(10)})
    assert distance(dhash("data/raw/images/a/copy0.jpg"), dhash("data/raw/images/a/000.jpg")) <= 20
    sizes = ["split.train=10", "split.val=5", "split.test=5"]
    parts = run_split(sizes)
    report = json.loads((project / "reports/split.json").read_text())
    where = {p: s for s, f in parts.items() for p in f["path"]}
    straddling = {(f"a/{i:03d}.jpg", f"a/copy{i}.jpg") for i in range(10)
                  if f"a/copy{i}.jpg" in where and f"a/{i:03d}.jpg" in where
                  and where[f"a/copy{i}.jpg"] != where[f"a/{i:03d}.jpg"]}
    found = {tuple(sorted((p["a"], p["b"]))) for p in report["cross_split_pairs"]}
    assert straddling and found == straddling  # every straddling copy, no distinct photo
    assert report["cross_split_near_duplicates"] == len(straddling) and report["near_duplicates_mode"] == "report"
    parts = run_split([*sizes, "split.near_duplicates=drop"])
    report = json.loads((project / "reports/split.json").read_text())
    assert report["near_duplicates_dropped"] == 10
    assert {d["path"] for d in report["near_duplicates"]} == {f"a/copy{i}.jpg" for i in range(10)}
    assert all(len(f[f["class"] == c]) == n for f, n in zip(parts.values(), (10, 5, 5), strict=True) for c in "ab")
    first = {s: (project / f"data/splits/{s}.csv").read_bytes() for s in parts}
    run_split([*sizes, "split.near_duplicates=drop"])
    assert {s: (project / f"data/splits/{s}.csv").read_bytes() for s in parts} == first  # deterministic
    run_split([*sizes, "split.near_duplicates=keep"])
    assert json.loads((project / "reports/split.json").read_text())["cross_split_pairs"] == []


def test_exclusions_and_relabels_from_params_are_honoured(project):
    import json

    make_raw(project, {"cat": 12, "dog": 12})
    parts = run_split(["split.train=6", "split.val=2", "split.test=2", "split.exclude=[cat/003.jpg]",
                       "split.relabel=[dog/005.jpg:cat]"])
    rows = pd.concat(parts.values())
    assert "cat/003.jpg" not in set(rows["path"])
    moved = rows[rows["path"] == "dog/005.jpg"].iloc[0]
    assert (moved["class"], moved["label"]) == ("cat", 0)
    verdicts = json.loads((project / "reports/split.json").read_text())["verdicts"]
    assert {v["reason"] for v in verdicts} == {"split.exclude", "relabelled dog -> cat"}


@pytest.mark.parametrize("override, match", [
    ("split.exclude=[cat/nope.jpg]", r"split.exclude: 'cat/nope.jpg' is not an image of data/raw/images"),
    ("split.relabel=[cat/001.jpg:horse]", r"class 'horse' is not one of cat, dog"),
    ("split.near_duplicates=maybe", r"'maybe' is not one of report, drop, keep"),
    ("split.relabel=[cat/001.jpg]", r"'cat/001.jpg' is not 'path:class'"),
])
def test_bad_verdicts_are_one_line(project, override, match):
    make_raw(project, {"cat": 12, "dog": 12})
    with pytest.raises(XferError, match=match):
        run_split(["split.train=6", "split.val=2", "split.test=2", override])
