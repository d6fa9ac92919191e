"""Images: the synthetic data set, validation/normalisation of photos, and tf.data pipelines from manifests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

SYNTHETIC_CLASSES = ("blobs", "stripes")


def synthetic_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image: smooth ellipses (label 0) or a patch of stripes (label 1) on a noisy background."""
    bg = rng.integers(0, 256, 3)
    arr = np.clip(bg + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    if label == 0:
        for _ in range(rng.integers(2, 5)):
            w, h = rng.integers(size // 4, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    else:
        period = rng.uniform(5, 10)
        w, h = rng.integers(size * 3 // 5, size, 2)
        x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        yy, xx = np.mgrid[0:h, 0:w]
        angle = rng.uniform(0, np.pi)
        mask = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1.0 < 0.5
        color = rng.integers(0, 256, 3)
        patch = np.empty((h, w, 3), np.uint8)
        patch[mask], patch[~mask] = color, 255 - color  # high-contrast stripes
        img.paste(Image.fromarray(patch), (int(x0), int(y0)))
    return img


def write_synthetic(out_dir: Path, per_class: int, size: int, seed: int) -> list[str]:
    """Write ``per_class`` seeded JPEGs per class into ``out_dir/<class>/``; return the class names."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(SYNTHETIC_CLASSES):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_image(label, size, rng).save(out_dir / name / f"{i:05d}.jpg", quality=90)
    return list(SYNTHETIC_CLASSES)


def normalise_image(data: bytes, min_side: int) -> tuple[bytes | None, str]:
    """Validate one image file's bytes.

    Returns ``(jpeg_bytes, "ok")`` for a usable image (the original bytes when they already are a
    baseline RGB JPEG, else a re-encoded RGB JPEG) or ``(None, reason)`` for one to drop.
    """
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # full decode: catches truncated files
            exif_rotated = img.getexif().get(0x0112, 1) not in (1, None)
            if min(img.size) < min_side:
                return None, f"too small ({img.size[0]}x{img.size[1]} < {min_side} px)"
            if fmt == "JPEG" and img.mode == "RGB" and not exif_rotated and not img.info.get("progressive"):
                return data, "ok"
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in img.info or "A" in img.mode):
                img = img.convert("RGBA")
                flat = Image.new("RGB", img.size, (255, 255, 255))
                flat.paste(img, mask=img.getchannel("A"))
                img = flat
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue(), "ok"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            return None, "not an image (unrecognised format)"
        return None, f"undecodable ({' '.join(str(exc).split())[:80]})"
    except Image.DecompressionBombError:
        return None, "too large (decompression bomb)"


def decode_and_resize(path, size: int):
    """tf.data map function: file path -> float32 RGB tensor (size, size, 3) with values in [0, 255]."""
    import tensorflow as tf

    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    return tf.image.resize(img, (size, size))


def load_resized(path: str, size: int) -> np.ndarray:
    """One image file as the pipelines feed it to a model: float32 (size, size, 3) in [0, 255]."""
    return decode_and_resize(str(path), size).numpy()


def image_dataset(paths: list[str], labels: np.ndarray, size: int, batch_size: int,
                  shuffle_seed: int | None = None, cache: bool = False):
    """Batched, prefetched ``(image, label)`` dataset; order preserved unless ``shuffle_seed`` is given.
    ``cache``: keep the decoded images in memory (as uint8, size*size*3 bytes each) for the epochs after the first."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None and not cache:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (decode_and_resize(p, size), y), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    if cache:
        ds = ds.map(lambda x, y: (tf.cast(tf.round(x), tf.uint8), y)).cache()
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
        if shuffle_seed is not None:
            ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    # No tf.data autotuning thread (AUTOTUNE then means one call per core and the legacy prefetch tuner): with it,
    # releasing an iterator while the model keeps the CPU busy can block until the autotuner's next wake-up (its
    # period doubles: 5, 10, 20, 41 s, ...), which cost featurize up to 40% of its time (bench/featurize.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)
