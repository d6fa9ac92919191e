"""The CSV source: a table with an image column and a label column, image paths relative to a folder or archive.

Reads and checks the table (one-line errors for a missing column or a label that cannot be a class name), drops
rows it cannot use with their reason (empty label, a path outside the images folder, a file listed under two
classes, a missing file), and turns the rest into the download stage's validation jobs: one per image, written to
``<out>/<label>/``. Class names are the labels, sorted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from xfer import XferError
from xfer.data.fetch import fetch, local_images

SAMPLE = 50  # image paths looked up to decide where the images of an unpacked archive start


def read_table(csv_path: Path, image_column: str, label_column: str, suffix: str = "") -> tuple[list[dict], list[dict]]:
    """Rows ``{"row", "path", "class"}`` of a CSV (row numbers as a spreadsheet shows them, header = 1), and
    the rows dropped, each with its reason."""
    import pandas as pd

    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise XferError(f"{csv_path}: not a readable CSV ({' '.join(str(exc).split())[:100]}); data.url must be a "
                        "comma-separated table with a header row") from None
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = columns
    for key, column in (("data.image_column", image_column), ("data.label_column", label_column)):
        if column not in columns:
            raise XferError(f"{key}: column '{column}' not in {csv_path.name}; columns found: {', '.join(columns)}")
    entries = []
    for i, (image, label) in enumerate(zip(frame[image_column], frame[label_column], strict=True), start=2):
        image, label = image.strip(), label.strip()
        entries.append((i, Path(f"{image}{suffix}").as_posix() if image else "", label))
    classes_of: dict[str, set[str]] = {}
    for _, path, label in entries:
        if path and label:
            classes_of.setdefault(path, set()).add(label)
    rows, dropped, first = [], [], {}
    for i, path, label in entries:
        reason = None
        if not label:
            reason = "empty label"
        elif "/" in label or "\\" in label or label.startswith(".") or label == "__MACOSX":
            raise XferError(f"{csv_path.name} row {i}: label '{label}' cannot be a class name (a folder name: no "
                            "slashes, no leading dot); fix the label column")
        elif not path:
            reason = "empty image path"
        elif Path(path).is_absolute() or ".." in Path(path).parts:
            reason = "path outside data.images"
        elif len(classes_of[path]) > 1:
            reason = f"listed under classes {', '.join(sorted(classes_of[path]))}"
        elif path in first:
            reason = f"listed again (row {first[path]})"
        if reason:
            dropped.append({"class": label or None, "path": path, "row": i, "reason": reason})
        else:
            first[path] = i
            rows.append({"row": i, "path": path, "class": label})
    return rows, dropped


def images_root(folder: Path, rows: list[dict]) -> Path:
    """Where the table's paths start: ``folder`` or, when an archive wraps everything in one top folder that the
    paths do not name, that folder."""
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    candidates = [folder] + (subdirs if len(subdirs) == 1 else [])
    sample = [r["path"] for r in rows[:SAMPLE]]
    return max(candidates, key=lambda c: sum((c / p).is_file() for p in sample))


def table_jobs(rows: list[dict], root: Path, out: Path, min_side: int) -> tuple[list[str], list[tuple], list[dict]]:
    """The class names, one validation job ``(src, dst, min_side)`` per row whose file exists, and the rows whose
    file does not."""
    classes = sorted({r["class"] for r in rows})
    if len(classes) < 2:
        raise XferError(f"the label column holds {len(classes)} class{'es' if len(classes) != 1 else ''} "
                        f"({', '.join(classes) or 'none'}); need at least 2")
    for cls in classes:
        (out / cls).mkdir(parents=True)
    jobs, missing, used = [], [], set()
    for r in rows:
        src = root / r["path"]
        if not src.is_file():
            missing.append({**r, "reason": f"missing (no file {r['path']} under data.images)"})
            continue
        stem = Path(r["path"]).with_suffix("").as_posix().replace("/", "__")
        name, n = f"{stem}.jpg", 1
        while (r["class"], name) in used:  # a.png and a.jpg listed side by side
            n += 1
            name = f"{stem}__{n}.jpg"
        used.add((r["class"], name))
        jobs.append((str(src), str(out / r["class"] / name), min_side))
    return classes, jobs, missing


def import_table(d, out: Path, tmp: Path, validate: Callable[[list, list, Path, list], dict]) -> tuple[list, dict]:
    """The CSV source end to end: the table (``d.url``) fetched and read, the images (``d.images``: folder or
    archive; null = the CSV's folder) found, each row's file validated by ``validate(jobs, classes, root,
    dropped)`` into ``out/<class>/``. Returns the classes and the download report (with its ``source``)."""
    url = str(d.url)
    if "://" not in url and not Path(url).expanduser().is_file():
        raise XferError(f"data.url: CSV {url} not found; give the path or http(s) URL of the labels table")
    table, digest = fetch(url, d.get("sha256"), float(d.timeout), int(d.retries))
    rows, dropped = read_table(table, str(d.image_column), str(d.label_column), str(d.get("suffix") or ""))
    location = d.get("images")
    if location is None:
        if url.startswith(("http://", "https://")):
            raise XferError("data.images: the CSV came from a URL; give the folder or archive its image paths are "
                            "relative to")
        location = str(table.parent)
    elif "://" not in str(location) and not Path(str(location)).expanduser().exists():
        raise XferError(f"data.images: {location} not found; give the folder or archive (zip/tar) of the images")
    folder, source, unpacked = local_images(str(location), tmp, None, d)
    root = images_root(folder, rows)
    classes, jobs, missing = table_jobs(rows, root, out, int(d.min_side))
    report = validate(jobs, classes, root, [*dropped, *missing])
    report["rows"] = len(rows) + len(dropped)
    report["source"] = {"csv": url, "csv_sha256": digest, "images": source}
    if unpacked is not None:
        shutil.rmtree(unpacked)
    return classes, report
