"""Atomic file writes: write beside the target, then rename, so nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xfer.core.signals import raise_if_interrupted


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporary siblings of ``target`` left by a process that no longer exists (SIGKILL, power
    cut): ``.<name>.tmp<pid>...`` files and folders written by :func:`atomic_path` / :func:`atomic_dir`."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp(\d+)")
    removed = []
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            m = pattern.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    # Keep the suffixes: Keras insists on ``.keras`` / ``.weights.h5``.
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}{''.join(target.suffixes)}")
    try:
        yield tmp
        raise_if_interrupted()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; it replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        raise_if_interrupted()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# A fixed timestamp for the entries of a .keras archive (the zip format's earliest date).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _renumber_shared_objects(node: Any, ids: dict[int, int]) -> Any:
    """Replace Keras's ``shared_object_id`` values (Python ``id()``s: memory addresses) by 1, 2, 3, ... in the
    order they first appear; equal ids stay equal, so the sharing they describe is kept."""
    if isinstance(node, dict):
        return {k: (ids.setdefault(v, len(ids) + 1) if k == "shared_object_id" else _renumber_shared_objects(v, ids))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber_shared_objects(v, ids) for v in node]
    return node


def make_keras_file_deterministic(path: str | Path) -> None:
    """Rewrite a ``.keras`` archive so that the same model gives the same bytes: drop ``date_saved`` from its
    metadata, number shared objects instead of naming them by memory address, and give every zip entry a
    fixed timestamp (Keras stamps the save time, which would make DVC see a new file, and rerun every stage
    downstream, after each identical retraining)."""
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as out:
        for info, data in entries:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            fixed.compress_type, fixed.external_attr = info.compress_type, 0o644 << 16
            out.writestr(fixed, data)
