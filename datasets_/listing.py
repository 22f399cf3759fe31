"""Which files a source is made of: its format, and its files listed with sizes and mtimes (what a
cached scan of it is keyed by), for local paths, brace patterns and object-store prefixes."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from datasets_ import objstore
from datasets_.objstore import DatasetError, is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "manifest.json"  # a prepared (transferlab) dataset's description, at its root


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00009}`` ranges (zero padding kept) and ``{a,b}`` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo)
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(pattern[: m.start()] + item + pattern[m.end() :])]


def detect_format(uri: str) -> str:
    """One of ``transferlab``, ``folder``, ``webdataset``, ``parquet`` for a local path/pattern."""
    if "{" in uri or uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    if is_remote(uri):
        return _detect_remote(uri)
    p = Path(uri)
    if not p.exists():
        raise DatasetError(f"{uri}: no such file or directory")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return "transferlab"
        names = [q.name for q in p.iterdir()]
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        return "folder"
    raise DatasetError(f"{uri}: not a dataset directory, .tar shard or .parquet file")


def _detect_remote(uri: str) -> str:
    """The format of an object-store prefix, from one listing of what lies directly under it."""
    found = objstore.kind(uri)
    if found is None:
        raise DatasetError(
            f"{uri}: not a transferlab dataset (no {MANIFEST}) nor a source (no objects under this prefix)"
        )
    if found == "file":
        raise DatasetError(f"{uri}: not a dataset prefix, .tar shard or .parquet file")
    names = objstore.child_names(uri)
    if MANIFEST in names:
        return "transferlab"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "folder"


def _remote_shards(uri: str, suffix: str) -> list[objstore.FileStat]:
    if "{" in uri:
        paths = expand_braces(uri)
        stats = objstore.stat(paths)
        missing = [p for p, st in zip(paths, stats) if st is None]
        if missing:
            raise DatasetError(f"{missing[0]}: shard named by {uri} does not exist")
        return stats
    if uri.endswith(suffix):
        st = objstore.stat([uri])[0]
        if st is None:
            raise DatasetError(f"{uri}: no such object")
        return [st]
    found = [f for f in objstore.list_files(uri) if f.path.endswith(suffix)]
    if not found:
        raise DatasetError(f"{uri}: no *{suffix} objects")
    return found


def shard_paths(uri: str, suffix: str) -> list[str]:
    if is_remote(uri):
        return [f.path for f in _remote_shards(uri, suffix)]
    if "{" in uri:
        paths = expand_braces(uri)
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DatasetError(f"{missing[0]}: shard named by {uri} does not exist")
        return paths
    if os.path.isdir(uri):
        paths = sorted(glob.glob(os.path.join(uri, "**", f"*{suffix}"), recursive=True))
        if not paths:
            raise DatasetError(f"{uri}: no *{suffix} files")
        return paths
    if not os.path.exists(uri):
        raise DatasetError(f"{uri}: no such file")
    return [uri]


def source_listing(uri: str, fmt: str) -> list[objstore.FileStat]:
    """The files a raw source reads, sorted, with sizes and mtimes: what a cached scan of it is
    keyed by. A remote source costs one listing (or one stat per named shard), not a read."""
    if not is_remote(uri):
        return [st for st in objstore.stat(source_files(uri, fmt)) if st is not None]
    if fmt == "folder":
        return [f for f in objstore.list_files(uri) if f.path.lower().endswith(IMAGE_EXTENSIONS)]
    return _remote_shards(uri, ".tar" if fmt == "webdataset" else ".parquet")


def source_files(uri: str, fmt: str) -> list[str]:
    """The files a raw source reads, sorted."""
    if is_remote(uri):
        return [f.path for f in source_listing(uri, fmt)]
    if fmt == "webdataset":
        return shard_paths(uri, ".tar")
    if fmt == "parquet":
        return shard_paths(uri, ".parquet")
    out = []
    for top, _, files in os.walk(uri):  # os.walk does not follow symlinked folders
        paths = (os.path.join(top, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        out += [p for p in paths if not os.path.islink(p)]  # the reader never follows links either
    return sorted(out)
