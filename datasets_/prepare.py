"""``transferlab data prepare`` / ``inspect`` and raw sources: any supported source → shards +
manifest (Parquet or WebDataset tars, locally or on an object store), or a cached scan that lets
a study read the source as it is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from datasets_.builtin import BUILTIN_PREFIX, TEST_FRACTION, cache_dir, prepare_builtin
from datasets_.listing import MANIFEST, detect_format, source_listing
from datasets_.objstore import DatasetError, filesystem, is_remote, write_atomic
from datasets_.progress import Progress
from datasets_.readers import BadSamples, Sample, folder_layout, iter_samples
from datasets_.shards import ShardedDataset, open_dataset, remove_dataset_dir, write_sharded_dataset
from datasets_.views import unit_hash

# Bump when a scan's index or manifest changes meaning, so cached scans are redone.
SCAN_VERSION = "2"  # 2: the index records Parquet row groups


def _rows(samples, bad: BadSamples, test_fraction: float, class_names: dict[int, str], record: dict, progress):
    """(split, row) pairs for the shard writer; fills ``record`` with the bad-sample summary
    once exhausted (the writer serializes the manifest after consuming every row)."""
    seen: set[str] = set()
    labeled: bool | None = None
    for s in samples:
        progress.update(s.shard)
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
        yield (
            split,
            {
                "key": s.key,
                "image": s.image,
                "label": -1 if s.label is None else s.label,
                "caption": s.caption,
                "shard": s.shard,
                "row_group": s.row_group,
            },
        )
    record.update(bad.summary())
    progress.close()


def _source_name(src: str) -> str:
    """``shards`` for ``/data/shards/{00000..00009}.tar`` or ``/data/shards/``; ``x`` for ``x.parquet``."""
    path = Path(src.rstrip("/"))
    stem = path.name.split("{")[0].removesuffix(".tar").removesuffix(".parquet").rstrip("-_.")
    return stem or path.parent.name or "dataset"


def _write(
    src: str,
    out: str,
    fmt: str,
    shard_size: int,
    test_fraction: float,
    bad: BadSamples,
    shard_format: str,
    extra: dict,
    keyed: bool = False,
    **parquet_columns,
) -> ShardedDataset:
    class_names: dict[int, str] = {}
    record: dict = {}
    progress = Progress(f"{'scan of' if shard_format == 'raw' else 'prepare'} {src}", len(source_listing(src, fmt)))
    ds = write_sharded_dataset(
        out,
        name=_source_name(src),
        classes=folder_layout(src)[1] if fmt == "folder" else None,
        rows=_rows(iter_samples(src, bad, **parquet_columns), bad, test_fraction, class_names, record, progress),
        shard_size=shard_size,
        extra={"origin": src, "source_format": fmt, "class_names": class_names, "bad_samples": record, **extra},
        shard_format=shard_format,
        keyed=keyed,
    )
    if ds.num_samples("train") + ds.num_samples("test") == 0:
        shutil.rmtree(out, ignore_errors=True)
        reasons = "".join(f", {k} x{v}" for k, v in bad.counts.items())
        first = f"; first: {bad.examples[0]}" if bad.examples else ""
        raise DatasetError(f"{src}: no usable samples ({bad.total} bad{reasons}{first})")
    return ds


def prepare(
    src: str,
    out: str,
    shard_size: int = 2000,
    test_fraction: float = TEST_FRACTION,
    on_bad_sample: str = "skip",
    shard_format: str = "parquet",
    **parquet_columns,
) -> tuple[ShardedDataset, BadSamples]:
    """Convert ``src`` (builtin name, image folder, WebDataset tars, Parquet) into ``out``: a
    directory or an object-store prefix (``s3://bucket/prefix``), as ``parquet`` shards or
    img2dataset-compatible ``webdataset`` tars.

    Samples whose layout names no split go to ``test`` with probability ``test_fraction`` by a
    hash of their key. Returns the dataset and the record of skipped samples (also written to
    the manifest as ``bad_samples``).
    """
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="transferlab-prepare-") as tmp:
            local, bad = prepare(
                src, f"{tmp}/ds", shard_size, test_fraction, on_bad_sample, shard_format, **parquet_columns
            )
            upload(local, out)
        return open_dataset(out), bad
    bad = BadSamples(on_bad_sample)
    if src.startswith(BUILTIN_PREFIX):
        cached = prepare_builtin(src[len(BUILTIN_PREFIX) :])
        if shard_format == "parquet":
            remove_dataset_dir(out)
            shutil.copytree(cached.root, out)
            return open_dataset(out), bad
        return _rewrite(cached, out, shard_size, shard_format), bad
    fmt = detect_format(src)
    if fmt == "transferlab":
        raise DatasetError(
            f"{src}: already a prepared transferlab dataset (inspect it with `transferlab data inspect`)"
        )
    return _write(src, out, fmt, shard_size, test_fraction, bad, shard_format, {}, **parquet_columns), bad


def _rewrite(ds: ShardedDataset, out: str, shard_size: int, shard_format: str) -> ShardedDataset:
    """A prepared dataset in another shard format (same samples, splits and class names)."""
    from datasets_.indexed import iter_encoded

    def rows():
        for split in ds.manifest["splits"]:
            for b in iter_encoded(ds, split, columns=("key", "image", "label", "caption")):
                for k, img, y, c in zip(b["key"], b["image"], b["label"], b["caption"]):
                    yield split, {"key": k, "image": img, "label": int(y), "caption": c}

    extra = {k: ds.manifest[k] for k in ("origin",) if k in ds.manifest}
    return write_sharded_dataset(out, ds.name, ds.classes, rows(), shard_size, extra=extra, shard_format=shard_format)


def upload(ds: ShardedDataset, uri: str) -> None:
    """Copy a local prepared dataset to ``uri`` (an object-store prefix or a folder), manifest
    last: until it lands, the prefix is not a dataset (:func:`open_dataset` looks for the
    manifest first). A raw scan's shards are its source's own files: only its index goes."""
    shards = [] if ds.format == "raw" else [s["path"] for s in ds.manifest["shards"]]
    try:
        fs, base = filesystem(uri.rstrip("/"))
        for rel in shards + list(ds.manifest.get("index", {}).values()):
            fs.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(Path(ds.root) / rel), f"{base}/{rel}", destination_filesystem=fs)
        write_atomic(f"{uri.rstrip('/')}/{MANIFEST}", lambda f: f.write(json.dumps(ds.manifest, indent=1).encode()))
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{uri}: cannot write dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def publish(ds: ShardedDataset, storage: str) -> str:
    """Where every node of a cluster opens ``ds``: a dataset this process built in its own cache
    (a builtin's shards, a raw source's scan index) is copied once to
    ``STORAGE/datasets/NAME-FINGERPRINT`` (an object store or a shared folder); any other dataset
    is already where its user put it, and stays."""
    if is_remote(ds.root) or not Path(ds.root).resolve().is_relative_to(cache_dir().resolve()):
        return str(ds.root)
    uri = f"{storage.rstrip('/')}/datasets/{ds.name}-{ds.fingerprint}"
    fs, base = filesystem(uri)
    if fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.File:
        upload(ds, uri)
    return uri


def scan_key(uri: str, fmt: str, test_fraction: float, parquet_columns: dict) -> tuple[str, list[dict]]:
    """(cache key, file listing) of a raw source: the key changes when any file's (or object's)
    name, size or modification time does, or the reading options do."""
    listing = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in source_listing(uri, fmt)]
    payload = {
        "v": SCAN_VERSION,
        "uri": uri if is_remote(uri) else os.path.abspath(uri),
        "fmt": fmt,
        "files": listing,
        "test_fraction": test_fraction,
        "columns": parquet_columns,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20], listing


def scan_source(
    uri: str, test_fraction: float = TEST_FRACTION, root: Path | None = None, fmt: str | None = None, **parquet_columns
) -> ShardedDataset:
    """A raw source (image folder, WebDataset tars, Parquet) as a dataset without copying its
    images: a scan writes keys, labels, captions, splits and counts to an index and manifest
    under the cache (``$TRANSFERLAB_CACHE/scans/``), reused while the source's files are
    unchanged. The scan decodes every image once (bad ones are skipped and counted, as in
    ``data prepare``); training then streams the images from the source's own files."""
    fmt = fmt or detect_format(uri)
    if fmt == "transferlab":
        return open_dataset(uri)
    key, listing = scan_key(uri, fmt, test_fraction, parquet_columns)
    out = (root or cache_dir()) / "scans" / key
    if (out / MANIFEST).is_file():
        return open_dataset(out)
    extra = {"shards": listing, "parquet_columns": parquet_columns, "test_fraction": test_fraction}
    bad = BadSamples("skip")
    return _write(uri, str(out), fmt, 1 << 30, test_fraction, bad, "raw", extra, keyed=True, **parquet_columns)


def resolve_dataset(uri: str, **parquet_columns) -> ShardedDataset:
    """Open ``builtin:NAME`` (preparing it if needed), a prepared dataset (directory or object
    store), or a raw source read as it is (:func:`scan_source`), local or on an object store."""
    if uri.startswith(BUILTIN_PREFIX):
        return prepare_builtin(uri[len(BUILTIN_PREFIX) :])
    if is_remote(uri):
        return scan_source(uri, fmt=detect_format(uri), **parquet_columns)
    if not os.path.exists(uri.split("{")[0]) or (Path(uri) / MANIFEST).is_file():
        return open_dataset(uri)
    try:
        return scan_source(uri, **parquet_columns)
    except DatasetError as e:
        if os.path.isdir(uri) and "no class folders" in str(e):
            raise DatasetError(
                f"{uri}: not a transferlab dataset (no {MANIFEST}) nor a source (no class folders, .tar or .parquet "
                "files)"
            ) from None
        raise


def inspect(uri: str, **parquet_columns) -> dict:
    """The manifest of a prepared dataset, or of a scan of a raw source (``prepared: false``)."""
    if uri.startswith(BUILTIN_PREFIX):
        return prepare_builtin(uri[len(BUILTIN_PREFIX) :]).manifest
    fmt = detect_format(uri)
    if fmt == "transferlab":
        return open_dataset(uri).manifest
    m = dict(scan_source(uri, fmt=fmt, **parquet_columns).manifest)
    m["unlabeled"] = sum(v["unlabeled"] for v in m["splits"].values())
    m["prepared"] = False
    return m


__all__ = ["prepare", "inspect", "publish", "resolve_dataset", "scan_source", "Sample"]
