"""Fetch an archive (local path, file:// or http(s):// URL) and unpack it safely."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from xfer import XferError
from xfer.core.config import repo_root

DOWNLOADS = "data/downloads"  # under the user's repo root: git-ignored, not a DVC output, shared by temp exps
CHUNK = 1 << 20
# Errors worth another try: a cut connection, a timeout, a 5xx or 429 answer.
TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead, http.client.RemoteDisconnected)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _offline(url: str, reason: object) -> XferError:
    return XferError(
        f"could not download {url} ({reason}); offline? download it elsewhere and pass "
        "data.url=/path/to/archive.zip, or run the offline demo: dvc exp run -S experiment=demo"
    )


def _stream(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part``, asking for a byte range when ``part`` already has data."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if have and resp.status != 206:  # server ignored the range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if have else "wb") as out, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], file=sys.stderr,
                     mininterval=1.0) as bar:
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0, retries: int = 5,
             backoff: float = 2.0) -> Path:
    """Stream ``url`` into ``dest.part`` (resuming with HTTP Range after a cut), verify, rename to ``dest``."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _stream(url, part, timeout)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # range past the end: the .part is complete or stale; start over
                part.unlink(missing_ok=True)
            elif exc.code < 500 and exc.code != 429:
                raise XferError(f"could not download {url}: HTTP {exc.code} {exc.reason}; check data.url") from None
            error: object = f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, TRANSIENT) or isinstance(exc.reason, ConnectionRefusedError):
                raise _offline(url, exc.reason) from None
            error = exc.reason
        except TRANSIENT as exc:
            error = exc
        if attempt == retries:
            raise _offline(url, f"{error}; gave up after {retries + 1} attempts")
        wait = backoff * 2**attempt
        print(f"download interrupted ({error}); retrying in {wait:.1f} s", file=sys.stderr)
        time.sleep(wait)
    digest = sha256_of(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise XferError(f"{url}: sha256 {digest} does not match data.sha256 {sha256}; the download was deleted")
    os.replace(part, dest)
    return dest


def fetch(url: str, sha256: str | None = None, timeout: float = 30.0, retries: int = 5) -> tuple[Path, str]:
    """Return a local path to the archive and its sha256 (downloading into data/downloads/ if needed).

    A file already in data/downloads/ is reused when it matches ``sha256`` (or when no sha256 is given).
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        path = repo_root() / DOWNLOADS / (Path(urllib.parse.unquote(parsed.path)).name or "archive")
        if path.is_file() and sha256 and sha256_of(path) != sha256:
            path.unlink()
        if not path.is_file():
            download(url, path, sha256, timeout, retries)
    else:
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
        if not path.is_file():
            raise XferError(f"data.url: archive {path} not found; give an existing zip/tar path or an http(s) URL")
    digest = sha256_of(path)
    if sha256 and digest != sha256:
        raise XferError(f"{path}: sha256 {digest} does not match data.sha256 {sha256}")
    return path, digest


def _safe_target(root: Path, name: str) -> Path | None:
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        return None
    target = (root / name).resolve()
    return target if target.is_relative_to(root.resolve()) else None


class _Budget:
    """Stop an extraction whose total size passes ``limit`` bytes (zip bombs, wrong archive)."""

    def __init__(self, archive: Path, limit: int):
        self.archive, self.limit, self.used = archive, limit, 0

    def copy(self, src, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                self.used += len(block)
                if self.used > self.limit:
                    raise XferError(f"{self.archive}: unpacks to more than data.max_extract_gb "
                                    f"({self.limit / 1e9:g} GB); raise it if the archive is right")
                out.write(block)


def extract(archive: Path, dest: Path, max_bytes: int) -> list[dict]:
    """Unpack the regular files of a zip/tar into ``dest``.

    Entries that would land outside ``dest`` (``..``, absolute paths), links and device files are refused and
    returned as ``{"entry", "reason"}``; the total unpacked size is bounded by ``max_bytes``.
    """
    refused, budget = [], _Budget(archive, max_bytes)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                kind = (info.external_attr >> 16) & 0o170000
                target = _safe_target(dest, info.filename)
                if target is None:
                    refused.append({"entry": info.filename, "reason": "path outside the archive folder"})
                elif kind not in (0, 0o100000):
                    refused.append({"entry": info.filename, "reason": "link or special file"})
                else:
                    with zf.open(info) as src:
                        budget.copy(src, target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isdir():
                    continue
                target = _safe_target(dest, member.name)
                if target is None:
                    refused.append({"entry": member.name, "reason": "path outside the archive folder"})
                elif not member.isfile():
                    refused.append({"entry": member.name, "reason": "link or special file"})
                else:
                    with tf.extractfile(member) as src:
                        budget.copy(src, target)
    else:
        raise XferError(f"{archive} is neither a zip nor a tar archive; data.url must point to one")
    return refused


def class_root(folder: Path) -> Path:
    """The folder whose subfolders are the classes: ``folder`` itself or its single top folder."""
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(subdirs) == 1 and not files:
        inner = [p for p in subdirs[0].iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(inner) >= 2:
            return subdirs[0]
    return folder


def local_images(location: str, tmp: Path, sha256: str | None, d) -> tuple[Path, dict, Path | None]:
    """Images as a folder: ``location`` itself when it is one, else the archive (path or URL; ``d`` gives
    timeout, retries, max_extract_gb) unpacked under ``tmp``. Returns the folder, what the report says about the
    source, and the unpacked copy to delete afterwards (None for a folder)."""
    import tempfile

    if Path(location).expanduser().is_dir():
        return Path(location).expanduser(), {"folder": str(location)}, None
    archive, digest = fetch(location, sha256, float(d.timeout), int(d.retries))
    unpacked = Path(tempfile.mkdtemp(prefix="unpack", dir=tmp))
    source = {"url": str(location), "archive": str(archive), "sha256": digest, "bytes": archive.stat().st_size,
              "refused_entries": extract(archive, unpacked, int(float(d.max_extract_gb) * 1e9))}
    return unpacked, source, unpacked
