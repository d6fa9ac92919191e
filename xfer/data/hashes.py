"""Perceptual hashes of images (256-bit dHash, PIL only) and the near-duplicate pairs they reveal.

dHash: the image as 17x16 grey pixels, one bit per horizontal neighbour pair (is the left one brighter?). A
resized, re-encoded copy keeps almost every bit (measured on 88 planted copies of real photos: 6 of 256 differ on
average, 95 % within 13), distinct photos differ in ~128. 256 bits, not the classic 64: at 64 bits, scenes with the
same coarse layout (sunsets over the sea) collide by the dozen in 5,000 photos (bench/audit.py). Our own few lines
instead of the `imagehash` package: the same algorithm, no dependency, and JPEGs decoded at a reduced scale (PIL's
draft mode), which makes hashing thousands of photos a few seconds' work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 16
BITS = SIDE * SIDE
MIN_BITS, MAX_BITS = BITS // 8, BITS - BITS // 8  # near-flat images hash to (almost) all 0s or 1s: never matched
CHUNK = 1024


def dhash(path: Path | str) -> np.ndarray:
    """The 256-bit difference hash of one image file, as 32 bytes."""
    with Image.open(path) as img:
        img.draft("L", (4 * SIDE, 4 * SIDE))  # JPEG: decode at a reduced scale, at least 64 px a side
        grey = np.asarray(img.convert("L").resize((SIDE + 1, SIDE), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits((grey[:, :-1] > grey[:, 1:]).ravel())


def dhashes(paths: Sequence[Path | str]) -> np.ndarray:
    """(n, 32) uint8 hashes of these files, in order."""
    return np.stack([dhash(p) for p in paths]) if len(paths) else np.zeros((0, BITS // 8), np.uint8)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits in which two hashes differ."""
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def _bits(hashes) -> np.ndarray:
    h = np.stack(list(hashes)) if not isinstance(hashes, np.ndarray) or hashes.dtype == object else hashes
    return np.unpackbits(h.reshape(len(h), -1), axis=1).astype(np.float32)


def close_pairs(a, b, max_distance: int) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` with distance <= ``max_distance`` between hashes ``a[i]`` and ``b[j]`` (``b``
    None: within ``a``, i < j), sorted; uninformative hashes (near-flat images) never match."""
    same = b is None
    if len(a) == 0 or (not same and len(b) == 0):
        return []
    xa = _bits(a)
    xb = xa if same else _bits(b)
    na, nb = xa.sum(axis=1), xb.sum(axis=1)
    ok_a, ok_b = (na >= MIN_BITS) & (na <= MAX_BITS), (nb >= MIN_BITS) & (nb <= MAX_BITS)
    out = []
    for start in range(0, len(xa), CHUNK):
        block = xa[start : start + CHUNK]
        dist = np.rint(na[start : start + CHUNK, None] + nb[None, :] - 2 * (block @ xb.T)).astype(np.int32)
        hit = (dist <= max_distance) & ok_a[start : start + CHUNK, None] & ok_b[None, :]
        if same:
            hit &= np.arange(start, start + len(block))[:, None] < np.arange(len(xb))[None, :]
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
