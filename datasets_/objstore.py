"""Local paths and object-store URIs (``s3://bucket/prefix``, ``gs://...``) behind the few
operations every layer needs: list a prefix, stat files, open a stream, read bytes, write a
file atomically. The leaf of the data layer: it imports nothing of transferlab. Everything goes through
``pyarrow.fs`` (the S3 endpoint comes from ``AWS_ENDPOINT_URL``, credentials from the usual AWS
variables), so Ray workers read what the driver listed. Local paths go through the same calls
where a reader does not care which it has, so one reader serves both.

Every failure to reach or read a URI becomes a one-line :class:`~datasets_.shards.DatasetError`
naming the URI: :class:`DatasetError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A dataset is missing, malformed or does not fit the request."""


def cache_dir() -> Path:
    """This machine's transferlab cache (builtin conversions, the report's run cache):
    ``$TRANSFERLAB_CACHE``, default ``~/.cache/transferlab``."""
    return Path(os.environ.get("TRANSFERLAB_CACHE", Path.home() / ".cache" / "transferlab"))


def is_remote(uri) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``...), read through pyarrow's filesystems
    (the S3 endpoint comes from ``AWS_ENDPOINT_URL``, credentials from the usual AWS variables)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str):
    """``(pyarrow filesystem, path in it)`` of a local path (made absolute) or an object-store URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(str(uri) if "://" in str(uri) else os.path.abspath(uri))


def write_atomic(uri: str, write: Callable) -> str:
    """``write(stream)`` into the file ``uri`` (parent folders made), so that no reader ever
    sees half of it: written aside and renamed into place on a local disk; one PUT on an object
    store, where an object appears whole or not at all. Returns the path in its filesystem."""
    import uuid

    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            write(f)
        return path
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        write(f)
    fs.move(tmp, path)
    return path


@dataclass(frozen=True)
class FileStat:
    """One object: what a cached scan of it is keyed by (a rewritten object changes size or mtime)."""

    path: str
    size: int
    mtime_ns: int


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _fs(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri.rstrip("/"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{uri}: cannot open ({_first_line(e)})") from None


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] + "://"


def kind(uri: str) -> str | None:
    """``file``, ``dir`` (a prefix holding objects) or None (nothing there)."""
    if not is_remote(uri):
        return "dir" if os.path.isdir(uri) else "file" if os.path.exists(uri) else None
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DatasetError(f"{uri}: cannot read ({_first_line(e)})") from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type)


def list_files(uri: str, recursive: bool = True) -> list[FileStat]:
    """The objects under a remote prefix, sorted by URI (directories left out)."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    scheme = _scheme(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise DatasetError(f"{uri}: cannot list ({_first_line(e)})") from None
    return sorted(
        (FileStat(scheme + i.path, i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File),
        key=lambda f: f.path,
    )


def child_names(uri: str) -> list[str]:
    """Names directly under a remote prefix: objects and sub-prefixes."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as e:
        raise DatasetError(f"{uri}: cannot list ({_first_line(e)})") from None
    return [i.base_name for i in infos]


def stat(uris: list[str]) -> list[FileStat | None]:
    """Size and mtime of each file (None where there is none), local or remote."""
    out: list[FileStat | None] = []
    remote = [u for u in uris if is_remote(u)]
    infos = {}
    if remote:
        import pyarrow.fs as pafs

        fs, _ = _fs(remote[0])
        paths = [_fs(u)[1] for u in remote]
        try:
            got = fs.get_file_info(paths)
        except OSError as e:
            raise DatasetError(f"{remote[0]}: cannot read ({_first_line(e)})") from None
        infos = {u: FileStat(u, i.size, i.mtime_ns or 0) for u, i in zip(remote, got) if i.type == pafs.FileType.File}
    for u in uris:
        if is_remote(u):
            out.append(infos.get(u))
        elif os.path.isfile(u):
            st = os.stat(u)
            out.append(FileStat(os.path.abspath(u), st.st_size, st.st_mtime_ns))
        else:
            out.append(None)
    return out


def open_stream(uri: str):
    """A sequential binary stream (a context manager) of a local file or an object."""
    if not is_remote(uri):
        return open(uri, "rb")
    fs, path = _fs(uri)
    return fs.open_input_stream(path)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a file or object; with ``max_bytes``, at most ``max_bytes + 1`` of them are
    read (a result longer than ``max_bytes`` means the file is larger: refuse it)."""
    try:
        with open_stream(uri) as f:
            return f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise DatasetError(f"{uri}: cannot read ({_first_line(e)})") from None


def head(uri: str, n: int) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter)."""
    with open_stream(uri) as f:
        return f.read(n)


def tail(uri: str, n: int) -> tuple[int, bytes]:
    """(size, last ``n`` bytes) of a file, without reading the rest."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - n))
            return size, f.read(n)
    fs, path = _fs(uri)
    with fs.open_input_file(path) as f:
        size = f.size()
        return size, f.read_at(min(n, size), max(0, size - n))
