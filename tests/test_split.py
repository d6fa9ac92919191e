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
