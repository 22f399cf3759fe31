"""``transferlab data prepare`` / ``inspect``: any supported source → Parquet shards + manifest."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

from datasets_.builtin import BUILTIN_PREFIX, TEST_FRACTION, prepare_builtin
from datasets_.readers import BadSamples, Sample, detect_format, folder_layout, iter_samples
from datasets_.shards import DatasetError, ShardedDataset, is_remote, open_dataset, write_sharded_dataset
from datasets_.views import unit_hash


def _rows(samples, bad: BadSamples, test_fraction: float, class_names: dict[int, str], record: dict):
    """(split, row) pairs for the shard writer; fills ``record`` with the bad-sample summary
    once exhausted (the writer serializes the manifest after consuming every row)."""
    seen: set[str] = set()
    labeled: bool | None = None
    for s in samples:
        if s.key in seen:
            bad.add("-", s.key, "duplicate key")
            continue
        seen.add(s.key)
        if labeled is None:
            labeled = s.label is not None
        if labeled and s.label is None:
            bad.add("-", s.key, "missing label")
            continue
        if s.label is not None and s.label < 0:
            bad.add("-", s.key, f"label out of range: {s.label}")
            continue
        if s.class_name is not None and s.label is not None:
            class_names.setdefault(s.label, s.class_name)
        split = s.split or ("test" if unit_hash([s.key], 0, "prepare-split")[0] < test_fraction else "train")
        yield split, {"key": s.key, "image": s.image, "label": -1 if s.label is None else s.label, "caption": s.caption}
    record.update(bad.summary())


def prepare(
    src: str,
    out: str,
    shard_size: int = 2000,
    test_fraction: float = TEST_FRACTION,
    on_bad_sample: str = "skip",
    **parquet_columns,
) -> tuple[ShardedDataset, BadSamples]:
    """Convert ``src`` (builtin name, image folder, WebDataset tars, Parquet) into ``out``.

    Samples whose layout names no split go to ``test`` with probability ``test_fraction`` by a
    hash of their key. Returns the dataset and the record of skipped samples (also written to
    the manifest as ``bad_samples``).
    """
    bad = BadSamples(on_bad_sample)
    if src.startswith(BUILTIN_PREFIX):
        cached = prepare_builtin(src[len(BUILTIN_PREFIX):])
        if Path(out).exists():
            shutil.rmtree(out)
        shutil.copytree(cached.root, out)
        return open_dataset(out), bad
    fmt = detect_format(src)
    if fmt == "transferlab":
        raise DatasetError(f"{src}: already a prepared transferlab dataset (inspect it with `transferlab data inspect`)")
    class_names: dict[int, str] = {}
    record: dict = {}
    samples = iter_samples(src, bad, **parquet_columns)
    folder_classes = None
    if fmt == "folder":
        folder_classes = folder_layout(src)[1]
    ds = write_sharded_dataset(
        out,
        name=Path(src.rstrip("/")).name.split("{")[0] or "dataset",
        classes=folder_classes,
        rows=_rows(samples, bad, test_fraction, class_names, record),
        shard_size=shard_size,
        extra={"origin": src, "source_format": fmt, "class_names": class_names, "bad_samples": record},
    )
    if ds.num_samples("train") + ds.num_samples("test") == 0:
        raise DatasetError(f"{src}: no usable samples ({bad.total} bad)")
    return ds, bad


def inspect(uri: str, **parquet_columns) -> dict:
    """The manifest of a prepared dataset, or one computed by scanning a raw source."""
    if uri.startswith(BUILTIN_PREFIX):
        return prepare_builtin(uri[len(BUILTIN_PREFIX):]).manifest
    if is_remote(uri):
        return open_dataset(uri).manifest
    fmt = detect_format(uri)
    if fmt == "transferlab":
        return open_dataset(uri).manifest
    bad = BadSamples("skip")
    counts: Counter = Counter()
    names: dict[int, str] = {}
    splits: Counter = Counter()
    total = 0
    digests = []
    for s in iter_samples(uri, bad, **parquet_columns):
        total += 1
        counts[-1 if s.label is None else s.label] += 1
        splits[s.split or "unsplit"] += 1
        digests.append(f"{s.key}\x1f{s.label}\x1f{hashlib.blake2b(s.image, digest_size=16).hexdigest()}")
        if s.class_name is not None and s.label is not None:
            names.setdefault(s.label, s.class_name)
    top = max((k for k in counts if k >= 0), default=-1)
    if fmt == "folder":
        classes = folder_layout(uri)[1]
    else:
        classes = [names.get(i, str(i)) for i in range(top + 1)]
    # Content fingerprint of the raw source (keys, labels, image bytes); a prepared copy has its
    # own fingerprint over its shards.
    fingerprint = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]
    return {
        "name": Path(uri.rstrip("/")).name,
        "format": fmt,
        "num_samples": total,
        "num_classes": len(classes),
        "classes": classes,
        "class_counts": [counts.get(i, 0) for i in range(len(classes))],
        "unlabeled": counts.get(-1, 0),
        "splits": dict(splits),
        "fingerprint": fingerprint,
        "bad_samples": bad.summary(),
        "prepared": False,
    }


__all__ = ["prepare", "inspect", "Sample"]
