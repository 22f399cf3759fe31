"""The on-disk dataset layout every reader in transferlab produces and consumes.

A *sharded dataset* is a directory::

    DIR/manifest.json
    DIR/train/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Each Parquet shard has the columns of :data:`SCHEMA`: a stable sample ``key`` (views and
few-shot sampling hash it, so it must never change), the encoded image bytes, the integer
``label`` and a ``caption``. The manifest records counts, class names, per-shard SHA-256
checksums and a dataset ``fingerprint`` derived from them: equal fingerprints mean equal bytes.

Two other manifest ``format`` s keep images elsewhere and add a Parquet *index* per split
(``index/<split>.parquet``: :data:`INDEX_SCHEMA`, in read order) so keys and labels stay cheap:
``webdataset`` (img2dataset-compatible tars ``<split>/part-NNNNN.tar`` written by ``data
prepare --format webdataset``) and ``raw`` (a scan of a source read as it is, see
:func:`datasets_.prepare.scan_source`; shards are the source's own files).

Every manifest also has a ``content_fingerprint``: SHA-256 over the sorted lines
``key, label, caption, BLAKE2b(image bytes)`` of every sample (:func:`sample_digest`). It does
not depend on shard format, shard size or order, so the same samples prepared as Parquet, as
tars, or scanned raw have the same ``content_fingerprint``.
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
# ``row_group``: a raw Parquet source's row group of the sample (null for tars and image files).
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("caption", pa.string()), ("shard", pa.string()),
                          ("row_group", pa.int64())])
MANIFEST = "manifest.json"
SHARD_FORMATS = ("parquet", "webdataset", "raw")
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
    def format(self) -> str:
        """``parquet`` (images in the shards), ``webdataset`` (tar shards) or ``raw`` (a source's own files)."""
        return self.manifest.get("format", "parquet")

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

    def resolve(self, path: str) -> str:
        """A shard path of the manifest or index as a path/URI to open (absolute stays absolute)."""
        return path if path.startswith("/") or is_remote(path) else f"{str(self.root).rstrip('/')}/{path}"

    def files(self, split: str) -> list[str]:
        """The files holding a split's images, in read order."""
        if self.format == "raw":
            shards = self.read_split(split, ("shard",)).column("shard").to_pylist()
            return [self.resolve(p) for p in dict.fromkeys(shards)]
        return [self.resolve(s["path"]) for s in self.manifest["shards"] if s["split"] == split]

    def read_split(self, split: str, columns: Sequence[str] = ("key", "label")) -> pa.Table:
        """Read whole columns of a split (cheap for key/label; use Ray Data for images)."""
        if self.format != "parquet":
            if split not in self.manifest.get("index", {}):
                return INDEX_SCHEMA.empty_table().select(list(columns))
            return pq.read_table(self.resolve(self.manifest["index"][split]), columns=list(columns))
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


def sample_digest(key: str, label: int, caption: str, image: bytes) -> str:
    """One line of the content fingerprint (see the module docstring)."""
    return f"{key}\x1f{int(label)}\x1f{caption or ''}\x1f{hashlib.blake2b(image, digest_size=16).hexdigest()}"


def content_fingerprint(digests: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]


def write_sharded_dataset(
    out_dir: str | os.PathLike,
    name: str,
    classes: Sequence[str] | None,
    rows: Iterable[tuple[str, dict]],
    shard_size: int = 2000,
    extra: dict | None = None,
    shard_format: str = "parquet",
) -> ShardedDataset:
    """Write ``(split, row)`` pairs (rows are dicts with the SCHEMA columns) as shards per split,
    plus a manifest.

    ``shard_format`` is ``parquet``, ``webdataset`` (img2dataset-compatible tars and an index) or
    ``raw`` (only the index: each row's ``shard`` names the source file its image stays in).
    ``classes=None`` infers ``0..max(label)`` (names from ``extra["class_names"]`` when given);
    label -1 marks an unlabeled sample. The directory appears atomically: rows are written to a
    temporary sibling and renamed, so a crash never leaves a half-written dataset behind.
    """
    from datasets_.indexed import write_tar

    if shard_format not in SHARD_FORMATS:
        raise DatasetError(f"unknown shard format '{shard_format}' (known: {', '.join(SHARD_FORMATS)})")
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
        index_rows: dict[str, list] = {}
        digests: list[str] = []

        def flush(split: str) -> None:
            buf = buffers.get(split)
            if not buf:
                return
            buffers[split] = []
            if shard_format == "raw":
                index_rows.setdefault(split, []).extend(buf)
                return
            rel = f"{split}/part-{index[split]:05d}.{'parquet' if shard_format == 'parquet' else 'tar'}"
            (tmp / split).mkdir(exist_ok=True)
            if shard_format == "parquet":
                pq.write_table(pa.Table.from_pylist(buf, schema=SCHEMA), tmp / rel)
            else:
                keys = write_tar(tmp / rel, buf, split, class_names)
                index_rows.setdefault(split, []).extend({**r, "key": k, "shard": rel, "row_group": None} for r, k in zip(buf, keys))
            shards.append({"path": rel, "split": split, "num_rows": len(buf)})
            index[split] += 1

        for split, row in rows:
            label = int(row["label"])
            if label < -1 or (classes is not None and label >= len(classes)):
                top = len(classes) - 1 if classes is not None else "..."
                raise DatasetError(f"{name}: label {label} of sample {row['key']} is outside 0..{top}")
            counts.setdefault(split, Counter())[label] += 1
            digests.append(sample_digest(row["key"], label, row.get("caption", ""), row["image"]))
            if shard_format == "raw":
                row = {k: row.get(k) for k in ("key", "label", "caption", "shard", "row_group")}
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
        content = content_fingerprint(digests)
        if shard_format == "raw":  # no shard bytes of its own: the samples are the dataset
            fingerprint = content
        else:
            fingerprint = hashlib.sha256(
                json.dumps([[s["path"], s["sha256"]] for s in shards] + [list(classes)]).encode()
            ).hexdigest()[:16]
        index_files = {}
        for split, irows in index_rows.items():
            (tmp / "index").mkdir(exist_ok=True)
            index_files[split] = f"index/{split}.parquet"
            pq.write_table(pa.Table.from_pylist(irows, schema=INDEX_SCHEMA), tmp / index_files[split])
        manifest = {
            "name": name,
            "format": shard_format,
            "num_samples": sum(v["num_samples"] for v in split_info.values()),
            "num_classes": len(classes),
            "classes": list(classes),
            "splits": split_info,
            "shards": shards,
            "fingerprint": fingerprint,
            "content_fingerprint": content,
            **({"index": index_files} if shard_format != "parquet" else {}),
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
    if manifest.get("format") == "raw":  # the shards are the source's own files, maybe remote
        _check_scan_current(manifest, root)
        return ShardedDataset(root, manifest)
    missing = [s["path"] for s in manifest["shards"] if not (root / s["path"]).is_file()]
    if missing:
        raise DatasetError(f"{root}: shard {missing[0]} listed in the manifest is missing")
    return ShardedDataset(root, manifest)


def _check_scan_current(manifest: dict, root: Path) -> None:
    """A scan is only true of the files it saw: refuse it once any has changed. A remote
    source is listed again (one listing per 1,000 objects, not a request per file)."""
    from datasets_ import objstore
    from datasets_.readers import source_listing

    origin = manifest.get("origin", str(root))
    if is_remote(origin):
        now = {f.path: f for f in source_listing(origin, manifest["source_format"])}
        stats = [now.get(s["path"]) for s in manifest["shards"]]
    else:
        stats = objstore.stat([s["path"] for s in manifest["shards"]])
    for s, st in zip(manifest["shards"], stats):
        if st is None or (st.size, st.mtime_ns) != (s["size"], s["mtime_ns"]):
            raise DatasetError(f"{s['path']}: changed since {origin} was scanned; validate the study again")
