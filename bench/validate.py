"""Benchmark: image validation throughput of the download stage (goal: >= 150 images/s on 2 cores).

usage: python bench/validate.py ARCHIVE.zip [--workers N]
e.g.   python bench/validate.py ../shared/data/petimages-dev.zip
Unpacking is timed separately; the figure that counts is validation (decode, check, normalise, write).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.download import import_folder, worker_pool  # noqa: E402
from xfer.data.fetch import class_root, extract  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--min-side", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, worker_pool() as pool:
        t0 = time.perf_counter()
        refused = extract(args.archive, Path(tmp) / "unpacked", 20 * 10**9)
        t1 = time.perf_counter()
        classes, report = import_folder(class_root(Path(tmp) / "unpacked"), Path(tmp) / "images", args.min_side,
                                        pool)
        t2 = time.perf_counter()
    kept = sum(c["kept"] for c in report["classes"].values())
    files = kept + len(report["dropped"])
    print(f"archive    {args.archive} ({len(refused)} entries refused)")
    print(f"unpack     {t1 - t0:.2f} s")
    print(f"validate   {files} files in {t2 - t1:.2f} s with {os.cpu_count()} workers: "
          f"{files / (t2 - t1):.0f} images/s (goal >= 150)")
    print(f"result     {kept} kept, {len(report['dropped'])} dropped; classes {classes}")


if __name__ == "__main__":
    main()
