"""Perceptual hashes of images (64-bit dHash, PIL only) and the near-duplicate pairs they reveal.

dHash: the image as 9x8 grey pixels, one bit per horizontal neighbour pair (is the left one brighter?). A resized,
re-encoded or slightly recoloured copy keeps almost every bit (typically 0-4 of 64 differ), distinct photos
differ in ~32. Our own ~20 lines instead of the `imagehash` package: same algorithm, no dependency, and JPEGs are
decoded at 1/8 scale (PIL's draft mode), which makes hashing a set of photos a few seconds' work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

BITS = 64
MIN_BITS, MAX_BITS = 8, 56  # near-flat images hash to (almost) all 0s or 1s and would all match each other
CHUNK = 2048


def dhash(path: Path | str) -> int:
    """The 64-bit difference hash of one image file."""
    with Image.open(path) as img:
        img.draft("L", (64, 64))  # JPEG: decode at a reduced scale, at least 64 px a side
        grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def dhashes(paths: Sequence[Path | str]) -> np.ndarray:
    """uint64 hashes of these files, in order."""
    return np.fromiter((dhash(p) for p in paths), dtype=np.uint64, count=len(paths))


def informative(hashes: np.ndarray) -> np.ndarray:
    """Which hashes carry enough structure to be matched (not a flat or nearly flat image)."""
    ones = np.bitwise_count(hashes)
    return (ones >= MIN_BITS) & (ones <= MAX_BITS)


def close_pairs(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, hamming distance)`` with distance <= ``max_distance`` between hashes ``a[i]`` and ``b[j]``
    (``b`` None: within ``a``, i < j), sorted; uninformative hashes never match."""
    same = b is None
    b = a if same else b
    ok_a, ok_b = informative(a), informative(b)
    out = []
    for start in range(0, len(a), CHUNK):
        block = a[start : start + CHUNK]
        dist = np.bitwise_count(block[:, None] ^ b[None, :])
        hit = (dist <= max_distance) & ok_a[start : start + CHUNK, None] & ok_b[None, :]
        if same:
            hit &= np.arange(start, start + len(block))[:, None] < np.arange(len(b))[None, :]
        for i, j in zip(*np.nonzero(hit), strict=True):
            out.append((start + int(i), int(j), int(dist[i, j])))
    return sorted(out)


def groups(n: int, pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    """Connected groups (of two or more) of items linked by ``pairs``, each sorted, ordered by first item."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])
