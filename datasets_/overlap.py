"""Leakage check: exact and near-duplicate images between two datasets.

Exact duplicates share decoded pixels (so a PNG and a re-saved PNG of the same image match).
Near duplicates are found in two steps: candidates whose 64-bit difference hashes (dHash: a 9×8
grayscale thumbnail, one bit per horizontally adjacent pixel pair) are within ``max_distance``
bits, confirmed when their 16×16 grayscale thumbnails differ by at most ``max_pixel_difference``
(mean absolute, of 255). dHash alone survives resizing and recompression but calls thousands of
different handwritten digits "similar" (MNIST vs digits at distance <= 10: 89,402 candidates,
0 confirmed), while a digit upscaled 4x and re-saved as JPEG is 7-8 bits away.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datasets_.indexed import iter_encoded
from datasets_.progress import Progress
from datasets_.safety import IMAGE_FORMATS
from datasets_.shards import ShardedDataset


def image_hashes(blob: bytes) -> tuple[str, int, np.ndarray]:
    """(pixel digest, 64-bit dHash, 16×16 grayscale thumbnail) of one encoded image."""
    with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as img:
        rgb = img.convert("RGB")
        digest = hashlib.blake2b(rgb.tobytes() + repr(rgb.size).encode(), digest_size=16).hexdigest()
        gray = rgb.convert("L")
        small = np.asarray(gray.resize((9, 8), Image.BILINEAR), dtype=np.int16)
        thumb = np.asarray(gray.resize((16, 16), Image.BILINEAR), dtype=np.uint8)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return digest, int(np.packbits(bits).view(">u8")[0]), thumb


@dataclass
class HashedSplit:
    keys: list[str]
    digests: list[str]
    dhashes: np.ndarray  # uint64
    thumbs: np.ndarray  # uint8 [N, 16, 16]


def hash_split(dataset: ShardedDataset, split: str) -> HashedSplit:
    keys, digests, dh, thumbs = [], [], [], []
    progress = Progress(f"overlap: hashing {dataset.name}/{split} ({dataset.num_samples(split):,} images)")
    for b in iter_encoded(dataset, split, 512, columns=("key", "image")):
        for key, blob in zip(b["key"], b["image"]):
            progress.update(None)
            d, h, t = image_hashes(blob)
            keys.append(key)
            digests.append(d)
            dh.append(h)
            thumbs.append(t)
    progress.close()
    return HashedSplit(
        keys, digests, np.array(dh, dtype=np.uint64), np.array(thumbs, dtype=np.uint8).reshape(-1, 16, 16)
    )


def near_pairs(
    a: np.ndarray, b: np.ndarray, max_distance: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (i, j) and Hamming distances of every pair with distance <= max_distance."""
    ii, jj, dd = [], [], []
    for start in range(0, len(a), chunk):
        dist = np.bitwise_count(a[start : start + chunk, None] ^ b[None, :])
        i, j = np.nonzero(dist <= max_distance)
        ii.append(i + start)
        jj.append(j)
        dd.append(dist[i, j])

    def cat(xs):
        return np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)

    return cat(ii), cat(jj), cat(dd)


def find_overlap(
    a: ShardedDataset,
    b: ShardedDataset,
    a_splits=("train", "test"),
    b_splits=("train", "test"),
    max_distance: int = 10,
    max_pixel_difference: float = 8.0,
) -> dict:
    """Exact and near-duplicate pairs between splits of ``a`` and ``b``."""
    report = {
        "a": a.name,
        "b": b.name,
        "max_distance": max_distance,
        "max_pixel_difference": max_pixel_difference,
        "pairs": [],
        "exact": 0,
        "near": 0,
        "candidates": 0,
    }
    hashed_b = {s: hash_split(b, s) for s in b_splits if b.num_samples(s)}
    for sa in a_splits:
        if not a.num_samples(sa):
            continue
        ha = hash_split(a, sa)
        for sb, hb in hashed_b.items():
            by_digest: dict[str, list[int]] = {}
            for j, d in enumerate(hb.digests):
                by_digest.setdefault(d, []).append(j)
            exact = {(i, j) for i, d in enumerate(ha.digests) for j in by_digest.get(d, [])}
            for i, j in sorted(exact):
                report["pairs"].append(
                    {
                        "a_split": sa,
                        "a_key": ha.keys[i],
                        "b_split": sb,
                        "b_key": hb.keys[j],
                        "kind": "exact",
                        "distance": 0,
                    }
                )
            ii, jj, dist = near_pairs(ha.dhashes, hb.dhashes, max_distance)
            report["candidates"] += len(ii)
            diffs = (
                np.concatenate(
                    [
                        np.abs(ha.thumbs[ii[k : k + 4096]].astype(np.int16) - hb.thumbs[jj[k : k + 4096]]).mean(
                            axis=(1, 2)
                        )
                        for k in range(0, len(ii), 4096)
                    ]
                )
                if len(ii)
                else np.zeros(0)
            )
            for i, j, d, diff in zip(ii, jj, dist, diffs):
                if diff <= max_pixel_difference and (int(i), int(j)) not in exact:
                    report["pairs"].append(
                        {
                            "a_split": sa,
                            "a_key": ha.keys[i],
                            "b_split": sb,
                            "b_key": hb.keys[j],
                            "kind": "near",
                            "distance": int(d),
                            "pixel_difference": round(float(diff), 2),
                        }
                    )
    report["exact"] = sum(p["kind"] == "exact" for p in report["pairs"])
    report["near"] = sum(p["kind"] == "near" for p in report["pairs"])
    return report
