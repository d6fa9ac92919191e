"""Benchmark: featurize stage throughput, memory and precision (random-weight backbone; nothing is downloaded).

usage: python bench/featurize.py speed [--images 256] [--size 180] [--photo 500x375] [--repeats 3]
       python bench/featurize.py memory [--images 20000] [--size 64]
       python bench/featurize.py precision [--images 64] [--size 180]
       python bench/featurize.py precision --all [--write]
speed:     (a) bare ``base.predict_on_batch`` on pre-decoded, pre-resized float32 batches in memory versus
           (b) ``xfer.nets.features.featurize_split`` (JPEG files -> tf.data decode/resize/batch/prefetch -> model ->
           memory-mapped .npy) on the same images; runs alternate a, b, a, b, ... after a warm-up.
           Goal: b / a >= 0.95 for VGG16 at 180 px on 2 cores.
memory:    featurize_split over N generated JPEGs; peak RSS (ru_maxrss) plus sampled peak RssAnon / RssFile
           (RssFile: shared libraries and the memory-mapped output). Goal: peak RSS < 3 GB for 20,000 images.
precision: runtime.precision float32 vs bfloat16 vs float16 with the same weights: speed of (a) (alternated runs)
           and the feature differences against float32. --all: float32 vs bfloat16 for every backbone at its own
           size; --write puts the faster one (bfloat16 only if >= 1.05x) into conf/backbone/<name>.yaml as
           ``precision.<device kind>``, the table runtime.precision=auto reads.
speed and precision also print the CPU cores other processes used during each run: trust runs where it is ~0.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xfer.data.images import synthetic_image  # noqa: E402

GB = 1024**3


def backbone_cfg(name: str, size: int):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "backbone" / f"{name}.yaml")
    cfg.weights, cfg.image_size = None, size  # random weights: no download
    return cfg


def write_jpegs(folder: Path, n: int, photo: tuple[int, int], seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` synthetic JPEGs of ``photo`` (width, height) pixels, quality 90; return paths and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    src = max(16, min(photo) // 2)  # upscaled 2x: smoother, closer to a photo than per-pixel noise
    paths = []
    for i, label in enumerate(labels):
        p = folder / f"{i:05d}.jpg"
        img = synthetic_image(int(label), src, rng)
        (img if img.size == photo else img.resize(photo, Image.BILINEAR)).save(p, quality=90)
        paths.append(str(p))
    return paths, labels


def decode_all(paths: list[str], size: int) -> np.ndarray:
    """The exact tensors featurize sees (same decode and resize), stacked in memory."""
    from xfer.data.images import decode_and_resize

    return np.stack([decode_and_resize(p, size).numpy() for p in paths])


def bare_predict(base, images: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """(a): images/s of ``predict_on_batch`` over in-memory batches, and the features."""
    start = time.perf_counter()
    out = [base.predict_on_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return len(images) / (time.perf_counter() - start), np.concatenate(out)


def busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all processes; /proc/stat on Linux) so far."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def others(fn, *args) -> tuple[object, float]:
    """Run ``fn(*args)``; also return the CPU cores used meanwhile by other processes (contention)."""
    t0, busy0, own0 = time.perf_counter(), busy_seconds(), sum(os.times()[:2])
    result = fn(*args)
    wall = time.perf_counter() - t0
    return result, max(0.0, busy_seconds() - busy0 - (sum(os.times()[:2]) - own0)) / wall


def summary(name: str, runs: list[float], busy: list[float]) -> str:
    return (f"{name}  best {max(runs):7.2f}  median {statistics.median(runs):7.2f} images/s  "
            f"(runs: {', '.join(f'{r:.2f}' for r in runs)}; other processes used "
            f"{', '.join(f'{c:.2f}' for c in busy)} cores)")


def speed(args: argparse.Namespace) -> None:
    import keras

    from xfer.nets.backbones import build_base
    from xfer.nets.features import featurize_split

    base = build_base(backbone_cfg(args.backbone, args.size))
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = write_jpegs(Path(tmp), args.images, args.photo)
        kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        images = decode_all(paths, args.size)
        print(f"{args.backbone} {args.size} px, {args.images} JPEGs {args.photo[0]}x{args.photo[1]} "
              f"({kb:.0f} KB avg), batch {args.batch_size}, {os.cpu_count()} CPUs, keras {keras.__version__}")
        base.predict_on_batch(images[: args.batch_size])  # warm-up: trace and compile
        featurize_split(base, paths[: 2 * args.batch_size], labels[: 2 * args.batch_size], Path(tmp), "warm",
                        args.batch_size)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(others(bare_predict, base, images, args.batch_size))
            b.append(others(featurize_split, base, paths, labels, Path(tmp), "bench", args.batch_size))
    a, a_busy, b, b_busy = [r[0][0] for r in a], [r[1] for r in a], [r[0] for r in b], [r[1] for r in b]
    print(summary("(a) predict_on_batch, in memory", a, a_busy))
    print(summary("(b) featurize_split, JPEG files", b, b_busy))
    print(f"ratio b/a  best {max(b) / max(a):.3f}  median {statistics.median(b) / statistics.median(a):.3f}  "
          f"(goal >= 0.95)")


class PeakRss:
    """Samples /proc/self/status (Linux) in a thread: peak RssAnon and RssFile in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory(args: argparse.Namespace) -> None:
    from xfer.nets.backbones import build_base
    from xfer.nets.features import featurize_split

    base = build_base(backbone_cfg(args.backbone, args.size))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths, labels = write_jpegs(Path(tmp), args.images, (args.photo_size, args.photo_size))
        print(f"generated {args.images} JPEGs {args.photo_size} px in {time.perf_counter() - t0:.0f} s")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with PeakRss() as peak:
            ips = featurize_split(base, paths, labels, Path(tmp), "bench", args.batch_size)
        out = (Path(tmp) / "bench_features.npy").stat().st_size
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{args.backbone} {args.size} px, features {base.output_shape[1:]}, {args.images} images, "
          f"{ips:.1f} images/s, output {out / GB:.2f} GB")
    print(f"peak RSS before featurize {before / GB:.2f} GB, after {maxrss / GB:.2f} GB (goal < 3 GB); "
          f"sampled peak RssAnon {peak.peak['RssAnon'] / GB:.2f} GB, RssFile {peak.peak['RssFile'] / GB:.2f} GB")


PRECISIONS = ("float32", "bfloat16", "float16")
CHOOSE_BF16 = 1.05  # --write: bfloat16 only where it is at least 5 % faster than float32 (else float32)


def measure(name: str, size: int, args: argparse.Namespace, precisions: tuple[str, ...]):
    """Images/s (best of alternated runs, with the other processes' cores) and features per precision."""
    from xfer.nets.backbones import backbone_cnn, build_base, set_precision

    cfg = backbone_cfg(name, size)
    bases = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = write_jpegs(Path(tmp), args.images, args.photo)
        images = decode_all(paths, size)
        weights = Path(tmp) / "base.weights.h5"
        for prec in precisions:  # the global policy applies to models built while it is set
            set_precision(prec)
            try:
                bases[prec] = build_base(cfg, weights_file=weights if bases else None)
            finally:
                set_precision("float32")
            if not weights.exists():
                backbone_cnn(bases[prec]).save_weights(str(weights))
    feats = {p: bare_predict(base, images, args.batch_size)[1].astype(np.float64) for p, base in bases.items()}
    runs: dict[str, list[tuple[float, float]]] = {p: [] for p in precisions}
    for _ in range(args.repeats):  # alternate the variants so contention hits them alike
        for prec, base in bases.items():
            (ips, _), busy = others(bare_predict, base, images, args.batch_size)
            runs[prec].append((ips, busy))
    return runs, feats


def precision(args: argparse.Namespace) -> None:
    if args.all:
        return precision_table(args)
    runs, feats = measure(args.backbone, args.size, args, PRECISIONS)
    ref = feats["float32"]
    print(f"{args.backbone} {args.size} px, {args.images} images, batch {args.batch_size}, best of {args.repeats} "
          f"alternated runs; differences vs float32 (max rel = max|d| / max|f32| with max|f32| = {abs(ref).max():.4g}, "
          f"l2 rel = ||d|| / ||f32||)")
    print(f"{'precision':<10} {'images/s':>9} {'max |d|':>10} {'mean |d|':>10} {'max rel':>9} {'l2 rel':>9}  "
          "other processes (cores)")
    for prec in PRECISIONS:
        d = np.abs(feats[prec] - ref)
        print(f"{prec:<10} {max(r[0] for r in runs[prec]):9.2f} {d.max():10.4g} {d.mean():10.4g} "
              f"{d.max() / abs(ref).max():9.2e} {np.linalg.norm(d) / np.linalg.norm(ref):9.2e}  "
              f"{', '.join(f'{r[1]:.2f}' for r in runs[prec])}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def precision_table(args: argparse.Namespace) -> None:
    """float32 vs bfloat16 for every conf/backbone/*.yaml at its own image size; with --write, the winner goes into
    that file's ``precision.<device kind>`` (what runtime.precision=auto then picks on this kind of device)."""
    from xfer.core.runtime import NATIVE_BF16, cpu_flags, device_kind

    kind = device_kind()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if limit:  # e.g. AVX512_CORE_VNNI: oneDNN emulates bfloat16 as on a CPU without avx512_bf16
        kind = f"{kind} limited by ONEDNN_MAX_CPU_ISA={limit}"
        if args.write:
            raise SystemExit("--write: not with ONEDNN_MAX_CPU_ISA set (the table is per real device kind)")
    print(f"{cpu_model()}, device kind {kind}, flags {' '.join(flags)}; {args.images} images, batch "
          f"{args.batch_size}, best of {args.repeats} alternated runs")
    print(f"{'backbone':<17} {'px':>4} {'float32 img/s':>14} {'bfloat16 img/s':>15} {'bf16/f32':>9}  choice  "
          "other processes (cores)")
    for conf in sorted((ROOT / "conf" / "backbone").glob("*.yaml")):
        from omegaconf import OmegaConf

        size = int(OmegaConf.load(conf).image_size)
        runs, _ = measure(conf.stem, size, args, ("float32", "bfloat16"))
        f32, bf16 = (max(r[0] for r in runs[p]) for p in ("float32", "bfloat16"))
        ratio = bf16 / f32
        choice = "bfloat16" if ratio >= CHOOSE_BF16 else "float32"
        busy = max(r[1] for rs in runs.values() for r in rs)
        print(f"{conf.stem:<17} {size:>4} {f32:14.1f} {bf16:15.1f} {ratio:8.2f}x  {choice:<8} max {busy:.2f}")
        if args.write and kind in NATIVE_BF16:
            write_choice(conf, kind, choice, f"bf16 {ratio:.2f}x f32 at {size} px on {cpu_model()}")


def write_choice(conf: Path, kind: str, choice: str, why: str) -> None:
    """Set ``precision.<kind>: <choice>  # <why>`` in a backbone's YAML, keeping the rest of the file as it is."""
    lines = conf.read_text().splitlines()
    entry = f"  {kind}: {choice}"
    entry = f"{entry:<32}# {why}"
    if "precision:" not in [line.split("#")[0].strip() for line in lines]:
        lines += ["precision:  # what runtime.precision=auto runs per device kind (bench/featurize.py precision --all)"]
    at = next(i for i, line in enumerate(lines) if line.startswith("precision:"))
    end = at + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    block = [line for line in lines[at + 1 : end] if not line.strip().startswith(f"{kind}:")]
    lines[at + 1 : end] = sorted([*block, entry])
    conf.write_text("\n".join(lines) + "\n")


def photo_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    modes = {"speed": (speed, 256, 180), "memory": (memory, 20000, 64), "precision": (precision, 64, 180)}
    for name, (_, images, size) in modes.items():
        p = sub.add_parser(name)
        p.add_argument("--images", type=int, default=images)
        p.add_argument("--size", type=int, default=size, help="backbone input size (px)")
        p.add_argument("--backbone", default="vgg16", help="a conf/backbone/*.yaml name")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--photo", type=photo_size, default=(500, 375), help="generated JPEG WxH (speed, precision)")
        p.add_argument("--photo-size", type=int, default=128, help="generated JPEG side (memory)")
        if name == "precision":
            p.add_argument("--all", action="store_true", help="every conf/backbone at its own size: f32 vs bf16")
            p.add_argument("--write", action="store_true", help="--all: put the winner in conf/backbone/*.yaml")
    args = ap.parse_args()
    modes[args.mode][0](args)


if __name__ == "__main__":
    main()
