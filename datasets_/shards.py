"""The on-disk dataset layout every reader in transferlab produces and consumes.

A *sharded dataset* is a directory::

    DIR/manifest.json
    DIR/train/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Each Parquet shard has the columns of :data:`SCHEMA`: a stable sample ``key`` (views and
few-shot sampling hash it, so it must never change), the encoded image bytes, the integer
``label`` and a ``caption``. The manifest records counts, class names, per-shard SHA-256
checksums and a dataset ``fingerprint`` derived from them: equal fingerprints mean equal bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("caption", pa.string()),
    ]
)
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset is missing, malformed or does not fit the request."""


@dataclass(frozen=True)
class Split:
    """Columns of one split, as numpy arrays (images stay encoded)."""

    keys: np.ndarray
    labels: np.ndarray


def is_remote(uri) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``...), read through pyarrow's filesystems
    (the S3 endpoint comes from ``AWS_ENDPOINT_URL``, credentials from the usual AWS variables)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def parquet_file(path: str) -> pq.ParquetFile:
    """Open one Parquet shard, local or remote."""
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        return pq.ParquetFile(fs.open_input_file(p))
    return pq.ParquetFile(path)


@dataclass(frozen=True)
class ShardedDataset:
    """A prepared dataset (a local directory, or an object-store prefix) and its manifest."""

    root: Path | str
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("num_samples", 0))

    def class_counts(self, split: str) -> list[int]:
        return list(self.manifest["splits"].get(split, {}).get("class_counts", [0] * self.num_classes))

    def files(self, split: str) -> list[str]:
        return [f"{str(self.root).rstrip('/')}/{s['path']}" for s in self.manifest["shards"] if s["split"] == split]

    def read_split(self, split: str, columns: Sequence[str] = ("key", "label")) -> pa.Table:
        """Read whole columns of a split (cheap for key/label; use Ray Data for images)."""
        tables = [pq.read_table(f, columns=list(columns)) for f in self.files(split)]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(list(columns))

    def keys_and_labels(self, split: str) -> Split:
        t = self.read_split(split, ("key", "label"))
        return Split(
            keys=np.asarray(t.column("key").to_pylist(), dtype=object),
            labels=t.column("label").to_numpy().astype(np.int64),
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sharded_dataset(
    out_dir: str | os.PathLike,
    name: str,
    classes: Sequence[str] | None,
    rows: Iterable[tuple[str, dict]],
    shard_size: int = 2000,
    extra: dict | None = None,
) -> ShardedDataset:
    """Write ``(split, row)`` pairs (rows are dicts with the SCHEMA columns) as Parquet shards
    per split, plus a manifest.

    ``classes=None`` infers ``0..max(label)`` (names from ``extra["class_names"]`` when given);
    label -1 marks an unlabeled sample. The directory appears atomically: rows are written to a
    temporary sibling and renamed, so a crash never leaves a half-written dataset behind.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    extra = dict(extra or {})
    class_names = extra.pop("class_names", {})
    try:
        shards: list[dict] = []
        buffers: dict[str, list] = {}
        counts: dict[str, Counter] = {}
        index: Counter = Counter()

        def flush(split: str) -> None:
            buf = buffers.get(split)
            if not buf:
                return
            rel = f"{split}/part-{index[split]:05d}.parquet"
            (tmp / split).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(buf, schema=SCHEMA), tmp / rel)
            shards.append({"path": rel, "split": split, "num_rows": len(buf)})
            buffers[split] = []
            index[split] += 1

        for split, row in rows:
            label = int(row["label"])
            if label < -1 or (classes is not None and label >= len(classes)):
                top = len(classes) - 1 if classes is not None else "..."
                raise DatasetError(f"{name}: label {label} of sample {row['key']} is outside 0..{top}")
            counts.setdefault(split, Counter())[label] += 1
            buffers.setdefault(split, []).append(row)
            if len(buffers[split]) >= shard_size:
                flush(split)
        for split in list(buffers):
            flush(split)
        if classes is None:
            top = max((lbl for c in counts.values() for lbl in c), default=-1)
            classes = [str(class_names.get(i, i)) for i in range(top + 1)]
        split_info = {
            split: {
                "num_samples": sum(c.values()),
                "class_counts": [c.get(i, 0) for i in range(len(classes))],
                "unlabeled": c.get(-1, 0),
            }
            for split, c in counts.items()
        }
        for s in shards:
            s["sha256"] = _sha256(tmp / s["path"])
        fingerprint = hashlib.sha256(
            json.dumps([[s["path"], s["sha256"]] for s in shards] + [list(classes)]).encode()
        ).hexdigest()[:16]
        manifest = {
            "name": name,
            "format": "parquet",
            "num_samples": sum(v["num_samples"] for v in split_info.values()),
            "num_classes": len(classes),
            "classes": list(classes),
            "splits": split_info,
            "shards": shards,
            "fingerprint": fingerprint,
            **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedDataset(out, manifest)


def _open_remote(uri: str) -> ShardedDataset:
    import pyarrow.fs as pafs

    root = uri.rstrip("/")
    try:
        fs, base = pafs.FileSystem.from_uri(root)
        info = fs.get_file_info(f"{base}/{MANIFEST}")
        if info.type != pafs.FileType.File:
            raise DatasetError(f"{uri}: not a transferlab dataset (no {MANIFEST})")
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
        shard_infos = fs.get_file_info([f"{base}/{s['path']}" for s in manifest["shards"]])
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{uri}: cannot read dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [s["path"] for s, i in zip(manifest["shards"], shard_infos) if i.type != pafs.FileType.File]
    if missing:
        raise DatasetError(f"{uri}: shard {missing[0]} listed in the manifest is missing")
    return ShardedDataset(root, manifest)


def open_dataset(path: str | os.PathLike) -> ShardedDataset:
    """Open a prepared dataset (directory or object-store URI); raise DatasetError naming the
    path if it is not one."""
    if is_remote(path):
        return _open_remote(str(path))
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DatasetError(f"{root}: not a transferlab dataset (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{mpath}: unreadable manifest ({e})") from None
    for field in ("name", "classes", "splits", "shards", "fingerprint"):
        if field not in manifest:
            raise DatasetError(f"{mpath}: manifest lacks '{field}'")
    missing = [s["path"] for s in manifest["shards"] if not (root / s["path"]).is_file()]
    if missing:
        raise DatasetError(f"{root}: shard {missing[0]} listed in the manifest is missing")
    return ShardedDataset(root, manifest)
