"""Download stage: synthetic source, image validation, safe extraction, offline message."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from xfer import XferError
from xfer.core.config import load_params
from xfer.core.files import read_json
from xfer.data.images import normalise_image


def jpeg_bytes(mode="RGB", size=(64, 48), fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "P") else (200, 30, 30, 255)[: len(mode)]).save(buf, fmt, **kw)
    return buf.getvalue()


def test_synthetic_source_is_seeded_jpegs(project):
    from stages.download import main

    cfg = load_params(["data=synthetic", "data.per_class=5", "data.image_size=48"])
    main(cfg)
    classes = read_json("data/raw/classes.json")
    assert classes == ["blobs", "stripes"]
    first = sorted((project / "data/raw/images/blobs").iterdir())
    assert len(first) == 5 and Image.open(first[0]).format == "JPEG"
    before = first[0].read_bytes()
    main(cfg)
    assert (project / "data/raw/images/blobs" / first[0].name).read_bytes() == before
    assert read_json("reports/download.json")["kept"] == 10
    assert read_json("reports/metrics/download.json") == {"kept": 10, "dropped": 0}
    assert read_json("reports/runs/download.json")["run_id"]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am a text file\n", "not an image"),
    (jpeg_bytes()[:200], "undecodable"),
    (jpeg_bytes(size=(20, 200)), "too small"),
])
def test_bad_images_are_dropped_with_a_reason(data, reason):
    out, why = normalise_image(data, min_side=32)
    assert out is None and reason in why


@pytest.mark.parametrize("data", [
    jpeg_bytes("CMYK"), jpeg_bytes("L"), jpeg_bytes(fmt="PNG"), jpeg_bytes("RGBA", fmt="PNG"),
    jpeg_bytes("P", fmt="GIF"),
])
def test_other_encodings_become_rgb_jpeg(data):
    out, why = normalise_image(data, min_side=32)
    assert why == "ok"
    img = Image.open(io.BytesIO(out))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 48))


def test_clean_rgb_jpeg_is_kept_byte_for_byte():
    data = jpeg_bytes()
    assert normalise_image(data, 32) == (data, "ok")


def make_archive(path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # a symlink entry
            zf.writestr(info, target)


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (64, 48), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


DIRTY = {
    "PetImages/Cat/ok.jpg": jpeg_bytes(size=(50, 40)),
    "PetImages/Cat/zero.jpg": b"",
    "PetImages/Cat/truncated.jpg": jpeg_bytes(size=(300, 200))[:400],
    "PetImages/Cat/png.jpg": jpeg_bytes(fmt="PNG"),
    "PetImages/Cat/gif.jpg": jpeg_bytes("P", fmt="GIF"),
    "PetImages/Cat/bmp.jpg": jpeg_bytes(fmt="BMP"),
    "PetImages/Cat/cmyk.jpg": jpeg_bytes("CMYK"),
    "PetImages/Cat/Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\x00" * 60,
    "PetImages/Dog/gray.jpg": jpeg_bytes("L"),
    "PetImages/Dog/rotated.jpg": exif_rotated_jpeg(),
    "PetImages/Dog/notes.txt": b"not a photo\n",
    "PetImages/Dog/nested/deeper.jpg": jpeg_bytes(),
    "PetImages/Dog/tiny.jpg": jpeg_bytes(size=(16, 16)),
    "PetImages/readme.txt": b"top-level file outside the class folders\n",
    "../evil.jpg": jpeg_bytes(),
    "/abs/evil.jpg": jpeg_bytes(),
}


def test_dirty_archive_every_bad_kind_is_handled(project, tmp_path):
    from stages.download import main

    archive = tmp_path / "pets.zip"
    make_archive(archive, DIRTY, links={"PetImages/Dog/link.jpg": "/etc/passwd"})
    main(load_params(["data=archive", f"data.url={archive}"]))
    assert read_json("data/raw/classes.json") == ["Cat", "Dog"]
    report = read_json("reports/download.json")
    reasons = {d["path"]: d["reason"] for d in report["dropped"]}
    assert reasons["Cat/zero.jpg"] == "empty file"
    assert reasons["Cat/truncated.jpg"].startswith("undecodable")
    assert reasons["Cat/Thumbs.db"].startswith("not an image")
    assert reasons["Dog/notes.txt"].startswith("not an image")
    assert reasons["Dog/tiny.jpg"].startswith("too small")
    assert report["classes"] == {"Cat": {"kept": 5, "dropped": 3}, "Dog": {"kept": 3, "dropped": 2}}
    refused = {r["entry"]: r["reason"] for r in report["source"]["refused_entries"]}
    assert set(refused) == {"../evil.jpg", "/abs/evil.jpg", "PetImages/Dog/link.jpg"}
    assert refused["PetImages/Dog/link.jpg"] == "link or special file"
    images = project / "data/raw/images"
    for name in ("Cat/png.jpg", "Cat/gif.jpg", "Cat/bmp.jpg", "Cat/cmyk.jpg", "Dog/gray.jpg", "Dog/rotated.jpg",
                 "Dog/nested__deeper.jpg"):
        img = Image.open(images / name)
        assert (img.format, img.mode) == ("JPEG", "RGB"), name
    assert Image.open(images / "Dog/rotated.jpg").size == (48, 64)  # EXIF orientation applied
    assert (images / "Cat/ok.jpg").read_bytes() == DIRTY["PetImages/Cat/ok.jpg"]
    assert not (tmp_path / "evil.jpg").exists() and not (project / "data" / "evil.jpg").exists()
    assert report["source"]["sha256"] and report["source"]["bytes"] == archive.stat().st_size


def test_every_kept_image_decodes_in_tensorflow(project, tmp_path):
    import tensorflow as tf

    from stages.download import main

    archive = tmp_path / "pets.zip"
    make_archive(archive, DIRTY)
    main(load_params(["data=archive", f"data.url={archive}"]))
    for path in (project / "data/raw/images").rglob("*.jpg"):
        assert tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3).shape[-1] == 3


def test_tar_archives_refuse_links_and_devices(project, tmp_path):
    import tarfile

    from stages.download import main

    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("a/1.jpg", "b/1.jpg"):
            data = jpeg_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("a/link.jpg", tarfile.SYMTYPE), ("a/dev", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    main(load_params(["data=archive", f"data.url={archive}"]))
    report = read_json("reports/download.json")
    assert {r["entry"] for r in report["source"]["refused_entries"]} == {"a/link.jpg", "a/dev"}
    assert report["kept"] == 2


def test_extraction_size_is_bounded(project, tmp_path):
    from stages.download import main

    archive = tmp_path / "big.zip"
    make_archive(archive, {"a/x.jpg": b"\0" * 3_000_000, "b/y.jpg": b"\0" * 3_000_000})
    with pytest.raises(XferError, match="unpacks to more than data.max_extract_gb"):
        main(load_params(["data=archive", f"data.url={archive}", "data.max_extract_gb=0.005"]))
    assert not (project / "data/raw").exists()


def test_folder_source_and_three_classes(project, tmp_path):
    from stages.download import main

    for cls in ("ant", "bee", "cow"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        (tmp_path / "photos" / cls / "1.jpg").write_bytes(jpeg_bytes())
    main(load_params(["data=folder", f"data.url={tmp_path / 'photos'}"]))
    assert read_json("data/raw/classes.json") == ["ant", "bee", "cow"]


def test_default_profile_offline_says_what_to_do(project):
    from stages.download import main

    with pytest.raises(XferError) as exc:
        main(load_params([]))
    msg = str(exc.value)
    assert "download.microsoft.com" in msg and "data.url=" in msg and "experiment=demo" in msg
    assert not (project / "data" / "raw").exists()  # nothing half-written


def test_checksum_mismatch_is_refused(project, tmp_path):
    from stages.download import main

    archive = tmp_path / "a.zip"
    make_archive(archive, {"a/x.jpg": jpeg_bytes(), "b/y.jpg": jpeg_bytes()})
    with pytest.raises(XferError, match="does not match data.sha256"):
        main(load_params(["data=archive", f"data.url={archive}", "data.sha256=" + "0" * 64]))



def test_http_download_goes_through_part_file_and_is_cached(project, tmp_path):
    """Served from 127.0.0.1: downloaded once into data/downloads/, then reused."""
    import functools
    import http.server
    import threading

    from stages.download import main

    served = tmp_path / "www"
    served.mkdir()
    make_archive(served / "pets.zip", {"top/cat/a.jpg": jpeg_bytes(), "top/dog/b.jpg": jpeg_bytes()})
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pets.zip"
        main(load_params(["data=archive", f"data.url={url}"]))
        main(load_params(["data=archive", f"data.url={url}"]))
    finally:
        server.shutdown()
    assert len(hits) == 1
    cached = project / "data/downloads/pets.zip"
    assert cached.read_bytes() == (served / "pets.zip").read_bytes()
    assert not list(cached.parent.glob("*.part"))
    assert read_json("data/raw/classes.json") == ["cat", "dog"]


class FlakyServer:
    """Serves one payload on 127.0.0.1; the first answer is cut halfway; honours Range requests."""

    def __init__(self, payload: bytes, cut_first: bool = True):
        import http.server
        import threading

        self.payload, self.requests = payload, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                body = outer.payload[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/archive.zip"

    def close(self):
        self.server.shutdown()


def test_download_resumes_after_a_cut_connection(tmp_path):
    import hashlib

    from xfer.data.fetch import download

    payload = bytes(range(256)) * 4096  # 1 MiB
    server = FlakyServer(payload)
    try:
        dest = download(server.url, tmp_path / "archive.zip", hashlib.sha256(payload).hexdigest(),
                        timeout=5, retries=3, backoff=0.01)
    finally:
        server.close()
    assert dest.read_bytes() == payload
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(payload) // 2}-"
    assert not (tmp_path / "archive.zip.part").exists()


def test_download_with_wrong_checksum_is_refused_and_deleted(tmp_path):
    from xfer.data.fetch import download

    server = FlakyServer(b"x" * 1000, cut_first=False)
    try:
        with pytest.raises(XferError, match="does not match data.sha256"):
            download(server.url, tmp_path / "archive.zip", "0" * 64, timeout=5, retries=0)
    finally:
        server.close()
    assert not list(tmp_path.iterdir())


def test_unreachable_server_gives_up_with_one_line(tmp_path):
    import socket

    from xfer.data.fetch import download

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(XferError, match=f"could not download http://127.0.0.1:{port}/a.zip .*experiment=demo"):
        download(f"http://127.0.0.1:{port}/a.zip", tmp_path / "a.zip", timeout=2, retries=2, backoff=0.01)


def test_validation_workers_are_forked_only_from_a_single_threaded_process():
    """A fork copies locks that other threads hold (MLflow's, SQLite's), and a worker could then wait forever: the
    download stage forks its pool before MLflow starts, and spawns it if another thread already runs."""
    import subprocess
    import sys

    code = ("import threading\nfrom stages.download import worker_pool\n"
            "with worker_pool() as p: print(p._ctx.get_start_method())\n"
            "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
            "with worker_pool() as p: print(p._ctx.get_start_method())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["fork", "spawn"]


def test_validation_workers_drop_the_stage_signal_handlers():
    """A worker that inherited the stage's SIGTERM handler could turn ``Pool.terminate``'s SIGTERM into an exception
    while waiting for the queue lock, and the stage then waited for it forever (seen in CI: a demo `download` hung
    15 minutes). Workers ignore Ctrl-C, die of SIGTERM, block neither; a pool torn down right after it started, a
    thousand times with the stage's handlers installed, never hangs."""
    import signal
    import subprocess
    import sys

    from stages.download import worker_pool
    from xfer.core import signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        signals.install()
        with worker_pool() as p:
            assert p.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
            assert p.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
            assert not {signal.SIGINT, signal.SIGTERM} & p.apply(signal.pthread_sigmask, (signal.SIG_BLOCK, []))
        assert signal.getsignal(signal.SIGTERM) == signals._on_signal  # the stage's own handler is kept
        assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])

    code = ("from stages.download import worker_pool\nfrom xfer.core import signals\nsignals.install()\n"
            "for _ in range(1000):\n    try:\n        with worker_pool():\n            raise ValueError\n"
            "    except ValueError:\n        pass\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert out.stdout.split() == ["ok"], out.stderr[-2000:]
