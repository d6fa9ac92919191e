"""The CSV source (data=csv): labels from a table, images from a folder or archive beside it; and the data set's
name taken from the data for every local source."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from xfer import XferError
from xfer.core.config import load_params
from xfer.core.files import read_json


def photo(seed: int, size=(64, 48), fmt="JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_set(folder, n_per_class=6, classes=("cat", "dog")):
    """Images in a flat folder (and one subfolder) and a labels table naming them."""
    (folder / "imgs" / "sub").mkdir(parents=True)
    rows = ["file,species,notes"]
    for c, cls in enumerate(classes):
        for i in range(n_per_class):
            name = f"sub/{cls}{i}.png" if i == 0 else f"{cls}{i}.jpg"
            (folder / "imgs" / name).write_bytes(photo(100 * c + i, fmt="PNG" if name.endswith("png") else "JPEG"))
            rows.append(f"{name},{cls},x")
    return rows


def run_csv(project, csv, *extra):
    from stages.download import main

    cfg = load_params(["data=csv", f"data.url={csv}", "data.image_column=file", "data.label_column=species", *extra])
    main(cfg)
    return cfg


def test_csv_with_a_folder_gives_the_same_raw_layout_as_class_folders(project, tmp_path):
    rows = write_set(tmp_path)
    rows += ["missing.jpg,cat,x", "broken.jpg,dog,x", "nolabel.jpg,,x", "../escape.jpg,cat,x", "cat1.jpg,cat,again",
             "both.jpg,cat,x", "both.jpg,dog,x"]
    (tmp_path / "imgs" / "broken.jpg").write_bytes(photo(1)[:150])
    (tmp_path / "imgs" / "nolabel.jpg").write_bytes(photo(2))
    (tmp_path / "imgs" / "both.jpg").write_bytes(photo(3))
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    cfg = run_csv(project, tmp_path / "pets.csv", f"data.images={tmp_path / 'imgs'}")
    assert read_json("data/raw/classes.json") == ["cat", "dog"]
    images = project / "data/raw/images"
    assert sorted(p.name for p in (images / "cat").iterdir()) == ["cat1.jpg", "cat2.jpg", "cat3.jpg", "cat4.jpg",
                                                                  "cat5.jpg", "sub__cat0.jpg"]
    assert Image.open(images / "dog/sub__dog0.jpg").format == "JPEG"  # the PNG normalised like any source
    assert (images / "cat/cat1.jpg").read_bytes() == (tmp_path / "imgs/cat1.jpg").read_bytes()
    report = read_json("reports/download.json")
    reasons = {(d["path"], d.get("row")): d["reason"] for d in report["dropped"]}
    assert reasons[("missing.jpg", 14)].startswith("missing")
    assert reasons[("broken.jpg", None)].startswith("undecodable")
    assert reasons[("nolabel.jpg", 16)] == "empty label"
    assert reasons[("../escape.jpg", 17)] == "path outside data.images"
    assert reasons[("cat1.jpg", 18)] == "listed again (row 3)"
    assert reasons[("both.jpg", 19)] == reasons[("both.jpg", 20)] == "listed under classes cat, dog"
    assert report["classes"]["cat"]["kept"] == 6 and report["classes"]["dog"]["kept"] == 6
    assert report["source"]["csv_sha256"] and report["rows"] == 19
    assert cfg.data.name == "pets"
    # the same stratified split as any source
    from stages.split import main as split

    split(load_params(["split.train=3", "split.val=1", "split.test=2"]))
    assert read_json("reports/split.json")["train"] == {"cat": 3, "dog": 3}


def test_csv_with_an_archive_and_bare_ids(project, tmp_path):
    """Kaggle's layout: labels.csv with ids without extension, train.zip wrapping the images in a top folder."""
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for i in range(4):
            zf.writestr(f"train/id{i}.jpg", photo(i))
    (tmp_path / "dogbreeds").mkdir()
    csv = tmp_path / "dogbreeds" / "labels.csv"
    csv.write_text("id,breed\nid0,pug\nid1,pug\nid2,collie\nid3,collie\n")
    from stages.download import main

    cfg = load_params(["data=csv", f"data.url={csv}", f"data.images={tmp_path / 'train.zip'}",
                       "data.image_column=id", "data.label_column=breed", "data.suffix=.jpg"])
    main(cfg)
    assert read_json("data/raw/classes.json") == ["collie", "pug"]
    assert read_json("reports/download.json")["kept"] == 4
    assert cfg.data.name == "dogbreeds"  # labels.csv says nothing: its folder names the data set
    assert read_json("reports/download.json")["source"]["images"]["sha256"]
    assert not [p for p in (project / "data/raw").rglob("unpack*")]


def test_missing_column_names_the_columns_found(project, tmp_path):
    write_set(tmp_path)
    (tmp_path / "t.csv").write_text("path,kind\na.jpg,cat\n")
    with pytest.raises(XferError, match=r"data.image_column: column 'file' not in t.csv; columns found: path, kind"):
        run_csv(project, tmp_path / "t.csv")
    assert not (project / "data/raw").exists()


@pytest.mark.parametrize("text, match", [
    ("file,species\na.jpg,x/y\n", r"row 2: label 'x/y' cannot be a class name"),
    ("file,species\na.jpg,cat\nb.jpg,cat\n", r"holds 1 class \(cat\); need at least 2"),
])
def test_bad_labels_are_one_line(project, tmp_path, text, match):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(XferError, match=match):
        run_csv(project, tmp_path / "t.csv")


def test_missing_csv_or_images_folder_says_which(project, tmp_path):
    with pytest.raises(XferError, match="data.url: CSV .*nope.csv not found"):
        run_csv(project, tmp_path / "nope.csv")
    (tmp_path / "t.csv").write_text("file,species\na.jpg,cat\n")
    with pytest.raises(XferError, match="data.images: .*gone not found"):
        run_csv(project, tmp_path / "t.csv", f"data.images={tmp_path / 'gone'}")


def test_a_class_smaller_than_the_split_is_one_line(project, tmp_path):
    rows = write_set(tmp_path, n_per_class=3)
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    run_csv(project, tmp_path / "t.csv", f"data.images={tmp_path / 'imgs'}")
    from stages.split import main as split

    with pytest.raises(XferError, match="class 'cat' has 3 images but train\\+val\\+test asks for 4"):
        split(load_params(["split.train=2", "split.val=1", "split.test=1"]))
    with pytest.raises(XferError, match="split: class 'cat' has 3 images; fractions need"):
        split(load_params(["split.train=0.5", "split.val=0.2", "split.test=0.2"]))


@pytest.mark.parametrize("overrides, name", [
    (["data=archive", "data.url=/data/flower_photos.tgz"], "flower_photos"),
    (["data=archive", "data.url=https://example.org/sets/flowers_v2.tar.gz"], "flowers_v2"),
    (["data=archive", "data.url=/data/flower_photos.zip", "data.name=mine"], "mine"),
    (["data=folder", "data.url=/home/me/photos/"], "photos"),
    (["data=csv", "data.url=/x/plants.csv"], "plants"),
    (["data=synthetic"], "synthetic"),
    (["data=archive"], "archive"),  # no url yet: the download stage says what is missing
])
def test_each_local_source_names_the_data_set_after_itself(project, overrides, name):
    from xfer.nets.serving import registered_name
    from xfer.track.runs import experiment_name

    cfg = load_params(overrides)
    assert cfg.data.name == name and experiment_name(cfg) == name
    assert registered_name(cfg) == f"{name}-classifier"


def test_csv_and_image_archive_by_url(project, tmp_path):
    """Both served from 127.0.0.1; a CSV from a URL needs data.images (no folder beside it)."""
    import functools
    import http.server
    import threading

    served = tmp_path / "www"
    served.mkdir()
    with zipfile.ZipFile(served / "imgs.zip", "w") as zf:
        for i in range(4):
            zf.writestr(f"p{i}.jpg", photo(i))
    (served / "plants.csv").write_text("file,species\np0.jpg,fern\np1.jpg,fern\np2.jpg,moss\np3.jpg,moss\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(XferError, match="data.images: the CSV came from a URL"):
            run_csv(project, f"{base}/plants.csv")
        cfg = run_csv(project, f"{base}/plants.csv", f"data.images={base}/imgs.zip")
    finally:
        server.shutdown()
    assert read_json("data/raw/classes.json") == ["fern", "moss"] and cfg.data.name == "plants"
    assert read_json("reports/download.json")["kept"] == 4
