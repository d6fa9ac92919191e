"""Download stage: get the images (archive, folder, CSV table of images and labels, or synthetic), validate every
one, write data/raw/.

Outputs: data/raw/images/<class>/*.jpg (only decodable RGB JPEGs), data/raw/classes.json,
reports/download.json (source, kept/dropped per class, each drop with its reason),
reports/metrics/download.json (the kept and dropped counts).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from xfer import XferError
from xfer.core.config import require, run_cli
from xfer.core.files import atomic_dir, write_json
from xfer.data.fetch import class_root, local_images
from xfer.data.images import normalise_image, write_synthetic
from xfer.data.paths import CLASSES, IMAGES, METRICS, RAW, REPORTS
from xfer.data.table import import_table
from xfer.track.recorder import log_artifact, log_metrics
from xfer.track.runs import stage_run

REPORT = REPORTS / "download.json"
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _check(job: tuple[str, str, int]) -> tuple[str, str, str]:
    src, dst, min_side = job
    data, reason = normalise_image(Path(src).read_bytes(), min_side)
    if data is not None:
        Path(dst).write_bytes(data)
    return src, dst, reason


def _quiet_worker() -> None:
    """A pool worker leaves signals to the stage: Ctrl-C ignored, SIGTERM (``Pool.terminate``) simply ends it.
    With the stage's handler inherited, a worker could turn that SIGTERM into an exception while it waits for the
    queue lock the terminating pool holds, and ``terminate`` then waited for it forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def worker_pool() -> Iterator[multiprocessing.pool.Pool]:
    """Processes for :func:`import_folder`. Forked only while this process has no other thread (a fork copies
    locks other threads hold, e.g. MLflow's, and a worker can then hang forever), else spawned. Signals are
    blocked while the workers start, so none reaches a worker before it has dropped the stage's handlers; the
    pool is closed and joined after success, terminated after an error or a signal."""
    method = "fork" if threading.active_count() == 1 else "spawn"
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool = multiprocessing.get_context(method).Pool(os.cpu_count() or 1, initializer=_quiet_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def validate(jobs: list[tuple[str, str, int]], classes: list[str], pool, src_root: Path,
             dropped: list[dict] = ()) -> dict:
    """Run the validation jobs in parallel; the report: kept/dropped per class, each drop with its reason."""
    kept, dropped = Counter(), list(dropped)
    for src, dst, reason in pool.imap_unordered(_check, jobs, chunksize=32):
        cls = Path(dst).parent.name
        if reason == "ok":
            kept[cls] += 1
        else:
            dropped.append({"class": cls, "path": Path(src).relative_to(src_root).as_posix(), "reason": reason})
    dropped.sort(key=lambda d: (d["path"], d.get("row", 0)))
    summary = {cls: {"kept": kept[cls], "dropped": sum(d["class"] == cls for d in dropped)} for cls in classes}
    return {"classes": summary, "dropped": dropped}


def import_folder(src_root: Path, out: Path, min_side: int, pool) -> tuple[list[str], dict]:
    """Validate every file under each class folder of ``src_root`` into ``out/<class>/``, in parallel."""
    classes = sorted(p.name for p in src_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise XferError(f"{src_root}: need at least 2 class folders, found {classes or 'none'}")
    jobs = []
    for cls in classes:
        (out / cls).mkdir(parents=True)
        files = sorted(p for p in (src_root / cls).rglob("*") if p.is_file())
        for f in files:
            stem = f.relative_to(src_root / cls).with_suffix("").as_posix().replace("/", "__")
            jobs.append((str(f), str(out / cls / f"{stem}.jpg"), min_side))
    return classes, validate(jobs, classes, pool, src_root)


def main(cfg: DictConfig) -> None:
    d = cfg.data
    with worker_pool() as pool, stage_run("download", cfg, ["data", "seed"]), atomic_dir(RAW) as tmp:
        images = tmp / IMAGES.relative_to(RAW)
        source = {}
        if d.kind == "synthetic":
            classes = write_synthetic(images, int(d.per_class), int(d.image_size), int(cfg.seed))
            report = {"classes": {c: {"kept": int(d.per_class), "dropped": 0} for c in classes}, "dropped": []}
        elif d.kind == "csv":
            require(cfg, "data.url")
            classes, report = import_table(d, images, tmp, lambda jobs, classes, root, dropped:
                                           validate(jobs, classes, pool, root, dropped))
            source = report.pop("source")
        elif d.kind in ("archive", "folder"):
            require(cfg, "data.url")
            if d.kind == "folder" and not Path(d.url).expanduser().is_dir():
                raise XferError(f"data.url: folder {d.url} not found; give a folder holding one folder per class")
            folder, source, unpacked = local_images(str(d.url), tmp, d.get("sha256"), d)
            src_root = class_root(folder)
            if unpacked is None:
                source = {"folder": str(src_root)}
            classes, report = import_folder(src_root, images, int(d.min_side), pool)
            if unpacked is not None:
                shutil.rmtree(unpacked)
        else:
            raise XferError(f"data.kind: '{d.kind}' is not one of archive, folder, csv, synthetic")
        report["source"] = source
        report["kept"] = sum(c["kept"] for c in report["classes"].values())
        report["dropped_total"] = len(report["dropped"])
        write_json(tmp / CLASSES.relative_to(RAW), classes)
        write_json(REPORT, report)
        write_json(METRICS / "download.json", {"kept": report["kept"], "dropped": report["dropped_total"]})

        log_metrics({"images_kept": report["kept"], "images_dropped": report["dropped_total"]})
        log_artifact(str(REPORT))
    per_class = ", ".join(f"{c}: {v['kept']} kept / {v['dropped']} dropped" for c, v in report["classes"].items())
    print(f"download: {report['kept']} images in {len(classes)} classes ({per_class})")
    unplaced = Counter(x["reason"].split(" (")[0] for x in report["dropped"] if "row" in x)
    if unplaced:
        print(f"download: {sum(unplaced.values())} rows of the CSV not used ("
              + ", ".join(f"{r}: {n}" for r, n in sorted(unplaced.items())) + "); see reports/download.json")


if __name__ == "__main__":
    run_cli(main)
