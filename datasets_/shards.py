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
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets_ import objstore
from datasets_.listing import MANIFEST, source_listing
from datasets_.objstore import DatasetError, is_remote

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("caption", pa.string()),
    ]
)
# ``row_group``: a raw Parquet source's row group of the sample (null for tars and image files).
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int64()),
        ("caption", pa.string()),
        ("shard", pa.string()),
        ("row_group", pa.int64()),
    ]
)
SHARD_FORMATS = ("parquet", "webdataset", "raw")
INDEX_ROWS = 65_536
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """Columns of one split, as numpy arrays (images stay encoded)."""

    keys: np.ndarray
    labels: np.ndarray


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


def sample_digest(key: str, label: int, caption: str, image: bytes) -> str:
    """One line of the content fingerprint (see the module docstring)."""
    return f"{key}\x1f{int(label)}\x1f{caption or ''}\x1f{hashlib.blake2b(image, digest_size=16).hexdigest()}"


def content_fingerprint(digests: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]


# Keys that can be WebDataset member names as they are: no dots (the extension starts at the
# first one), no '..', relative. Other keys are written under a counter and kept in KEY.json.
_MEMBER_KEY = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*")


def image_extension(blob: bytes) -> str:
    """``jpg``, ``png`` or ``webp`` from the image bytes' magic number (PIL decides on the bytes
    when reading, so any other format goes as ``png``)."""
    if blob[:2] == b"\xff\xd8":
        return "jpg"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "webp"
    return "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same rows, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, rows: list[dict], split: str, class_names: dict) -> list[str]:
    """Write rows as an img2dataset-layout tar (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.cls``
    when labelled, ``KEY.json``); returns the keys as a reader of the tar will see them."""
    keys = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, row in enumerate(rows):
            key, label = row["key"], int(row["label"])
            member = key if _MEMBER_KEY.fullmatch(key) and len(key) < 200 else f"{path.stem}-{i:09d}"
            meta = {"key": key, "split": split}
            if label >= 0 and label in class_names:
                meta["class_name"] = class_names[label]
            _add(tar, f"{member}.{image_extension(row['image'])}", row["image"])
            _add(tar, f"{member}.txt", (row.get("caption") or "").encode())
            if label >= 0:
                _add(tar, f"{member}.cls", str(label).encode())
            _add(tar, f"{member}.json", json.dumps(meta, sort_keys=True).encode())
            keys.append(key)
    return keys


class _ShardWriter:
    """Rows of one dataset written into ``tmp`` as shards per split (and, for tars and raw
    sources, an index), with what the manifest says of them."""

    def __init__(
        self, tmp: Path, name: str, classes: Sequence[str] | None, shard_format: str, shard_size: int, class_names: dict
    ):
        self.tmp, self.name, self.classes, self.format, self.shard_size = tmp, name, classes, shard_format, shard_size
        self.class_names = class_names
        self.shards: list[dict] = []
        self.buffers: dict[str, list] = {}
        self.counts: dict[str, Counter] = {}
        self.parts: Counter = Counter()  # shards written per split
        self.index_rows: dict[str, list] = {}
        self.digests: list[str] = []

    def add(self, split: str, row: dict) -> None:
        label = int(row["label"])
        if label < -1 or (self.classes is not None and label >= len(self.classes)):
            top = len(self.classes) - 1 if self.classes is not None else "..."
            raise DatasetError(f"{self.name}: label {label} of sample {row['key']} is outside 0..{top}")
        self.counts.setdefault(split, Counter())[label] += 1
        self.digests.append(sample_digest(row["key"], label, row.get("caption", ""), row["image"]))
        if self.format == "raw":
            row = {k: row.get(k) for k in ("key", "label", "caption", "shard", "row_group")}
        self.buffers.setdefault(split, []).append(row)
        if len(self.buffers[split]) >= self.shard_size:
            self.flush(split)

    def flush(self, split: str) -> None:
        buf = self.buffers.get(split)
        if not buf:
            return
        self.buffers[split] = []
        if self.format == "raw":
            self.index_rows.setdefault(split, []).extend(buf)
            return
        rel = f"{split}/part-{self.parts[split]:05d}.{'parquet' if self.format == 'parquet' else 'tar'}"
        (self.tmp / split).mkdir(exist_ok=True)
        if self.format == "parquet":
            pq.write_table(pa.Table.from_pylist(buf, schema=SCHEMA), self.tmp / rel)
        else:
            keys = write_tar(self.tmp / rel, buf, split, self.class_names)
            self.index_rows.setdefault(split, []).extend(
                {**r, "key": k, "shard": rel, "row_group": None} for r, k in zip(buf, keys)
            )
        self.shards.append({"path": rel, "split": split, "num_rows": len(buf)})
        self.parts[split] += 1

    def finish(self, extra: dict) -> dict:
        """Flush every split, write the index, and return the manifest."""
        for split in list(self.buffers):
            self.flush(split)
        classes = self.classes
        if classes is None:
            top = max((lbl for c in self.counts.values() for lbl in c), default=-1)
            classes = [str(self.class_names.get(i, i)) for i in range(top + 1)]
        split_info = {
            split: {
                "num_samples": sum(c.values()),
                "class_counts": [c.get(i, 0) for i in range(len(classes))],
                "unlabeled": c.get(-1, 0),
            }
            for split, c in self.counts.items()
        }
        for s in self.shards:
            s["sha256"] = _stream_sha256(str(self.tmp / s["path"]))
        content = content_fingerprint(self.digests)
        if self.format == "raw":  # no shard bytes of its own: the samples are the dataset
            fingerprint = content
        else:
            listing = [[s["path"], s["sha256"]] for s in self.shards] + [list(classes)]
            fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        index_files = {}
        for split, irows in self.index_rows.items():
            (self.tmp / "index").mkdir(exist_ok=True)
            index_files[split] = f"index/{split}.parquet"
            # Row groups of INDEX_ROWS let planning read a big index in parts (datasets_.view_stats).
            table = pa.Table.from_pylist(irows, schema=INDEX_SCHEMA)
            pq.write_table(table, self.tmp / index_files[split], row_group_size=INDEX_ROWS)
        return {
            "name": self.name,
            "format": self.format,
            "num_samples": sum(v["num_samples"] for v in split_info.values()),
            "num_classes": len(classes),
            "classes": list(classes),
            "splits": split_info,
            "shards": self.shards,
            "fingerprint": fingerprint,
            "content_fingerprint": content,
            **({"index": index_files} if self.format != "parquet" else {}),
            **extra,
        }


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise DatasetError naming ``path`` unless a new dataset may take its place: nothing there,
    an empty folder, or a folder holding a dataset (its manifest). ``--out ~/data`` must never
    delete someone's data."""
    out = Path(path)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DatasetError(f"{out}: exists and is not a folder; refusing to replace it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise DatasetError(
            f"{out}: not empty and not a transferlab dataset (no {MANIFEST}); refusing to replace it "
            "(choose a new folder, or empty this one yourself)"
        )


def remove_dataset_dir(path: str | os.PathLike) -> None:
    """Remove a dataset folder so that a new one can take its place (see :func:`check_replaceable`)."""
    check_replaceable(path)
    if Path(path).exists():
        shutil.rmtree(path)


def write_sharded_dataset(
    out_dir: str | os.PathLike,
    name: str,
    classes: Sequence[str] | None,
    rows: Iterable[tuple[str, dict]],
    shard_size: int = 2000,
    extra: dict | None = None,
    shard_format: str = "parquet",
    keyed: bool = False,
) -> ShardedDataset:
    """Write ``(split, row)`` pairs (rows are dicts with the SCHEMA columns) as shards per split,
    plus a manifest.

    ``shard_format`` is ``parquet``, ``webdataset`` (img2dataset-compatible tars and an index) or
    ``raw`` (only the index: each row's ``shard`` names the source file its image stays in).
    ``classes=None`` infers ``0..max(label)`` (names from ``extra["class_names"]`` when given);
    label -1 marks an unlabeled sample. The directory appears atomically: rows are written to a
    temporary sibling and renamed, so a crash never leaves a half-written dataset behind. An
    ``out_dir`` already there is replaced only if it is a dataset (see :func:`remove_dataset_dir`),
    checked before any row is read.

    ``keyed``: ``out_dir`` is a cache entry named by what it holds (a builtin's conversion, a
    source's scan), which two processes may write at once: the first to finish keeps it and a
    later writer discards its own copy, so no reader of the first ever sees its files vanish.
    """
    if shard_format not in SHARD_FORMATS:
        raise DatasetError(f"unknown shard format '{shard_format}' (known: {', '.join(SHARD_FORMATS)})")
    out = Path(out_dir)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    extra = dict(extra or {})
    try:
        writer = _ShardWriter(tmp, name, classes, shard_format, shard_size, extra.pop("class_names", {}))
        for split, row in rows:
            writer.add(split, row)
        manifest = writer.finish(extra)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if keyed:
            try:
                os.rename(tmp, out)  # refused where another writer's dataset already is
            except OSError:
                if not (out / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return open_dataset(out)
        else:
            remove_dataset_dir(out)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedDataset(out, manifest)


def _check_manifest_paths(manifest: dict, where: str) -> None:
    """A manifest may name only files inside its own dataset: relative paths without ``..``
    (a raw scan's shards are its source's files, listed as the scan found them; its index is
    its own). Otherwise a dataset anyone can write would make a trial open any path or URI."""
    own = list(manifest.get("index", {}).values())
    if manifest.get("format") != "raw":
        own += [s.get("path") for s in manifest["shards"]]
    for path in own:
        if (
            not isinstance(path, str)
            or not path
            or path.startswith(("/", "\\"))
            or "://" in path
            or ":" in path.split("/", 1)[0]
            or ".." in path.replace("\\", "/").split("/")
        ):
            raise DatasetError(
                f"{where}: the manifest names {repr(path)[:200]}, outside the dataset; refusing to open it"
            )


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
        _check_manifest_paths(manifest, uri)
        if manifest.get("format") == "raw":  # a scan's shards are the source's own files
            _check_scan_current(manifest, root)
            return ShardedDataset(root, manifest)
        shard_infos = fs.get_file_info([f"{base}/{s['path']}" for s in manifest["shards"]])
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(
            f"{uri}: cannot read dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
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
    _check_manifest_paths(manifest, str(root))
    if manifest.get("format") == "raw":  # the shards are the source's own files, maybe remote
        _check_scan_current(manifest, root)
        return ShardedDataset(root, manifest)
    missing = [s["path"] for s in manifest["shards"] if not (root / s["path"]).is_file()]
    if missing:
        raise DatasetError(f"{root}: shard {missing[0]} listed in the manifest is missing")
    return ShardedDataset(root, manifest)


def _stream_sha256(uri: str) -> str:
    """SHA-256 of a local file or an object, read 1 MiB at a time."""
    h = hashlib.sha256()
    with objstore.open_stream(uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(ds: ShardedDataset) -> tuple[int, list[str]]:
    """(shards checked, problems): each shard's bytes hashed again (streamed, local or remote)
    and compared with the SHA-256 its manifest records (``transferlab data verify``). Readers
    check each shard the same way when they first read it (:func:`check_shard`); this checks
    them all at once. A raw scan's shards are its source's files, checked by size and mtime on
    open instead, so none is hashed here."""
    problems, checked = [], 0
    for shard in ds.manifest["shards"]:
        if "sha256" not in shard:
            continue
        checked += 1
        try:
            digest = _stream_sha256(ds.resolve(shard["path"]))
        except OSError as e:
            problems.append(f"{shard['path']}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        if digest != shard["sha256"]:
            problems.append(f"{shard['path']}: SHA-256 {digest[:16]}... differs from the manifest's")
    return checked, problems


# (shard path or URI, SHA-256) pairs this process has hashed and found as their manifest says.
_INTACT: set[tuple[str, str]] = set()


def check_shard(path: str, sha256: str | None) -> None:
    """Refuse a shard whose bytes are not those its manifest recorded: the first read of each
    shard in a process hashes it (streamed: one more pass over the file, about 1 ms per MB
    local); later reads trust that. ``sha256=None`` (a raw scan's source file, checked by size
    and mtime on open) checks nothing. :class:`DatasetError` naming the shard on a mismatch."""
    if not sha256 or (path, sha256) in _INTACT:
        return
    try:
        digest = _stream_sha256(path)
    except OSError as e:
        raise DatasetError(
            f"{path}: cannot read shard ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if digest != sha256:
        raise DatasetError(
            f"{path}: SHA-256 {digest[:16]}... differs from the manifest's: the shard changed after "
            "`data prepare`; prepare the dataset again"
        )
    _INTACT.add((path, sha256))


def _check_scan_current(manifest: dict, root: Path | str) -> None:
    """A scan is only true of the files it saw: refuse it once any has changed. A remote
    source is listed again (one listing per 1,000 objects, not a request per file)."""
    origin = manifest.get("origin", str(root))
    if is_remote(origin):
        now = {f.path: f for f in source_listing(origin, manifest["source_format"])}
        stats = [now.get(s["path"]) for s in manifest["shards"]]
    else:
        stats = objstore.stat([s["path"] for s in manifest["shards"]])
    for s, st in zip(manifest["shards"], stats):
        if st is None:
            raise DatasetError(
                f"{s['path']}: no such file here, though the scan of {origin} read it (a source on a "
                "cluster must be on storage every node reads: s3://..., a shared mount)"
            )
        if (st.size, st.mtime_ns) != (s["size"], s["mtime_ns"]):
            raise DatasetError(f"{s['path']}: changed since {origin} was scanned; validate the study again")
