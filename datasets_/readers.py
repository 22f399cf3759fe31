"""Readers for the formats researchers already have, as they are on disk.

- **Image folders** (ImageNet style): ``root/<class_name>/*.{jpg,jpeg,png,webp}``, optionally with
  ``train/`` and ``val/`` or ``test/`` under ``root``.
- **WebDataset tars** as img2dataset writes them: per sample ``KEY.jpg|png|webp``, ``KEY.txt``
  (caption), optional ``KEY.json`` and ``KEY.cls`` (integer label). Brace patterns such as
  ``shards/{00000..00099}.tar`` name many shards.
- **Parquet** (img2dataset's parquet output, or anyone's): an encoded-image column plus optional
  label, caption and key columns whose names are configurable.

Each is read from a local path or an object-store URI (``s3://bucket/imgs/``,
``s3://bucket/laion/{00000..00099}.tar``), listed and streamed through :mod:`datasets_.objstore`;
tars are read as streams either way, so the safety checks below are the same for both.

Every reader yields :class:`Sample` s. Images are checked (decodable, within a pixel limit)
before they are accepted; a bad sample is skipped and counted by a :class:`BadSamples`, or
raises :class:`~datasets_.shards.DatasetError` naming shard and key when ``on_bad_sample`` is
``"error"``. Tars are read as streams: members are never extracted, and anything but a regular
file (symlinks, devices, directories) is ignored.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import os
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from datasets_ import objstore
from datasets_.listing import IMAGE_EXTENSIONS, detect_format, shard_paths
from datasets_.objstore import DatasetError, is_remote
from datasets_.safety import (
    IMAGE_FORMATS,
    MAX_CAPTION_BYTES,
    MAX_CAPTION_CHARS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_KEY_BYTES,
    MAX_LABEL_BYTES,
    MAX_METADATA_BYTES,
    MAX_ROW_GROUP_BYTES,
    BoundedTarInfo,
    compression,
    too_many_bytes,
    too_many_pixels,
    unsafe_member,
)
from datasets_.shards import parquet_file

__all__ = ["MAX_CAPTION_CHARS", "MAX_IMAGE_PIXELS"]  # re-exported; the limits live in datasets_.safety
SPLIT_ALIASES = {"train": "train", "val": "test", "valid": "test", "validation": "test", "test": "test"}


@dataclass
class Sample:
    key: str
    image: bytes
    label: int | None = None
    caption: str = ""
    split: str | None = None  # from the source's own layout; None = assign by key hash
    class_name: str | None = None
    shard: str = ""  # the file it came from (a tar, a Parquet file, or the image file itself)
    row_group: int | None = None  # a Parquet sample's row group (read units are row-group ranges)


@dataclass
class BadSamples:
    """Counts of skipped samples by reason, with the first few (shard, key) examples."""

    on_bad_sample: str = "skip"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, shard: str, key: str, reason: str) -> None:
        if self.on_bad_sample == "error":
            raise DatasetError(f"{shard}: sample '{key}': {reason}")
        self.counts[reason.split(":")[0]] += 1
        if len(self.examples) < 5:  # keys and names come from the data: cut to fit a line
            example = f"{shard}:{key}: {reason}"
            self.examples.append(example if len(example) <= 300 else example[:297] + "...")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}


def check_image(blob: bytes) -> str | None:
    """None if ``blob`` is a decodable JPEG, PNG or WebP within the pixel limit, else the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as img:
                reason = too_many_pixels(img)
                if reason:
                    return reason
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"image too large: {e}"
    except Image.UnidentifiedImageError:
        return "undecodable image: not a JPEG, PNG or WebP"
    except Exception as e:  # PIL raises many types for corrupt data
        return f"undecodable image: {type(e).__name__}"
    return None


# ---------------------------------------------------------------------------------------------


def _remote_folder(
    root: str,
) -> tuple[list[tuple[str, str | None]], list[str], dict[str, list[str]], dict[str, int]]:
    """:func:`folder_layout` of a prefix, from one listing, plus the image URIs under each
    class prefix (``{split_prefix}/{class}``), sorted by name, and every object's size."""
    base = root.rstrip("/")
    listing = objstore.list_files(base)
    rel = [f.path[len(base) + 1 :].split("/") for f in listing]
    splits = sorted({p[0] for p in rel if len(p) >= 3 and p[0] in SPLIT_ALIASES})
    depth = 1 if splits else 0
    layouts = [(f"{base}/{d}", SPLIT_ALIASES[d]) for d in splits] if splits else [(base, None)]
    images: dict[str, list[str]] = {}
    for p in rel:
        if len(p) == depth + 2 and (not splits or p[0] in splits):
            images.setdefault(f"{base}/{'/'.join(p[:-1])}", []).append(p[-1])
    classes = sorted({p[depth] for p in rel if len(p) >= depth + 2 and (not splits or p[0] in splits)})
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class_name>/*.jpg)")
    files = {
        d: [f"{d}/{n}" for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)] for d, names in images.items()
    }
    return layouts, classes, files, {f.path: f.size for f in listing}


def _read_image_file(uri: str, size: int) -> tuple[bytes | None, str | None]:
    """(bytes, None) of an image file within :data:`MAX_IMAGE_BYTES` (refused from its listed
    ``size`` unread, and read no further than the limit should it have grown), else (None, reason)."""
    reason = too_many_bytes("image", size, MAX_IMAGE_BYTES)
    blob = None if reason else objstore.read_bytes(uri, MAX_IMAGE_BYTES)
    if blob is not None and len(blob) > MAX_IMAGE_BYTES:
        blob, reason = None, f"image too large: over the limit of {MAX_IMAGE_BYTES} bytes"
    return blob, reason or (check_image(blob) if blob is not None else None)


def folder_layout(root: str) -> tuple[list[tuple[Path | str, str | None]], list[str]]:
    """(split directories with their split names, sorted class names) of an image folder."""
    if is_remote(root):
        return _remote_folder(root)[:2]
    base = Path(root)
    # Symlinked folders are not followed: they could lead anywhere on the machine.
    splits = [d for d in sorted(base.iterdir()) if d.is_dir() and not d.is_symlink() and d.name in SPLIT_ALIASES]
    layouts = [(d, SPLIT_ALIASES[d.name]) for d in splits] if splits else [(base, None)]
    classes = sorted({c.name for d, _ in layouts for c in d.iterdir() if c.is_dir() and not c.is_symlink()})
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class_name>/*.jpg)")
    return layouts, classes


def _iter_remote_folder(root: str, bad: BadSamples) -> Iterator[Sample]:
    """:func:`iter_folder` of a prefix: same keys, order and labels as the folder copied to disk."""
    base = root.rstrip("/")
    layouts, classes, files, sizes = _remote_folder(base)
    for directory, split in layouts:
        for label, name in enumerate(classes):
            for uri in files.get(f"{directory}/{name}", []):
                key = uri[len(base) + 1 :].rsplit(".", 1)[0]
                blob, reason = _read_image_file(uri, sizes[uri])
                if reason:
                    bad.add(f"{directory}/{name}", uri.rsplit("/", 1)[1], reason)
                    continue
                yield Sample(key=key, image=blob, label=label, split=split, class_name=name, shard=uri)


def iter_folder(root: str, bad: BadSamples) -> Iterator[Sample]:
    """ImageNet-style folders; class names are the sub-folder names, sorted."""
    if is_remote(root):
        yield from _iter_remote_folder(root, bad)
        return
    base = Path(root)
    layouts, classes = folder_layout(root)
    for directory, split in layouts:
        for label, name in enumerate(classes):
            class_dir = directory / name
            if not class_dir.is_dir() or class_dir.is_symlink():
                continue
            for f in sorted(class_dir.iterdir()):
                if f.is_symlink() or not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                key = str(f.relative_to(base).with_suffix("")).replace(os.sep, "/")
                blob, reason = _read_image_file(str(f), f.stat().st_size)
                if reason:
                    bad.add(str(class_dir), f.name, reason)
                    continue
                yield Sample(key=key, image=blob, label=label, split=split, class_name=name, shard=str(f))


def _ends_with_eof_marker(path: str) -> bool:
    """A complete tar ends with two zero blocks; Python's tarfile quietly stops at a truncated
    header instead of failing, so this is how a cut-off shard is noticed."""
    size, end = objstore.tail(path, 1024)
    return size >= 1024 and end == b"\0" * 1024


# What a tar member of each extension may hold, read only when within its limit; members of
# other extensions are skipped unread.
_MEMBER_LIMITS = {
    **{ext: ("image", MAX_IMAGE_BYTES) for ext in ("jpg", "jpeg", "png", "webp")},
    "txt": ("caption", MAX_CAPTION_BYTES),
    "cls": ("label", MAX_LABEL_BYTES),
    "json": ("metadata", MAX_METADATA_BYTES),
}
_DECOMPRESS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}


def _tar_groups(path: str, bad: BadSamples, allow_compressed: bool = False) -> Iterator[tuple[str, dict, str | None]]:
    """(key, {extension: bytes}, refusal) per sample, consecutive members grouped as WebDataset
    does; ``refusal`` is why the sample is refused unread (a member over its size limit)."""
    try:
        packed = compression(objstore.head(path, 6))
        if packed and (not allow_compressed or packed not in _DECOMPRESS):
            how = (
                "allow it with allow_compressed: true (--allow-compressed)" if packed in _DECOMPRESS else "unsupported"
            )
            bad.add(path, "(whole shard)", f"compressed tar refused: {packed}; {how}")
            return
        # A compressed tar's decompressor raises EOFError where it is cut short; a plain one ends
        # with an end-of-archive marker.
        complete = True if packed else _ends_with_eof_marker(path)
        # A stream, local or remote: members are read in order, never extracted or sought.
        with objstore.open_stream(path) as raw:
            f = _DECOMPRESS[packed](raw) if packed else raw
            with f, tarfile.open(fileobj=f, mode="r|", tarinfo=BoundedTarInfo) as tar:
                current, group, refusal = None, {}, None
                for member in tar:
                    unsafe = unsafe_member(member)  # links, devices, absolute or '..' names
                    if unsafe is not None:
                        if unsafe:
                            bad.add(path, member.name, unsafe)
                        continue
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    key, ext = name[: len(name) - len(base)] + key, ext.lower()
                    if key != current:
                        if current is not None:
                            yield current, group, refusal
                        current, group, refusal = key, {}, None
                    if ext not in _MEMBER_LIMITS:
                        continue  # never read: skipped in the stream
                    what, limit = _MEMBER_LIMITS[ext]
                    too_big = too_many_bytes(what, member.size, limit)
                    if too_big:
                        if ext != "json":  # oversized metadata is only ignored: it names classes
                            refusal = refusal or too_big
                        continue
                    data = tar.extractfile(member)
                    payload = data.read() if data else b""
                    if len(payload) != member.size:
                        raise tarfile.ReadError(f"member {name} is cut short")
                    group[ext] = payload
                if current is not None and complete:
                    yield current, group, refusal
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        bad.add(path, "(rest of shard)", f"truncated or corrupt tar: {e}")
        return
    if not complete:
        # The last group may be missing members: it is dropped with the rest of the shard.
        bad.add(path, "(end of shard)", "truncated or corrupt tar: no end-of-archive marker")


def iter_webdataset(
    uri: str, bad: BadSamples, check_images: bool = True, allow_compressed: bool = False
) -> Iterator[Sample]:
    """Samples of img2dataset-style tars. A ``KEY.json`` with a string ``"key"`` names the sample
    (img2dataset writes the member key there; transferlab's own tars use it for keys that cannot
    be member names). ``check_images=False`` skips the decode check (images already vetted).
    Compressed tars are refused (counted bad, whole) unless ``allow_compressed``."""
    for path in shard_paths(uri, ".tar"):
        for key, parts, refusal in _tar_groups(path, bad, allow_compressed):
            if refusal:
                bad.add(path, key, refusal)
                continue
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if ext is None:
                bad.add(path, key, "no image member")
                continue
            reason = check_image(parts[ext]) if check_images else None
            if reason:
                bad.add(path, key, reason)
                continue
            label = None
            if "cls" in parts:
                try:
                    label = int(parts["cls"].decode().strip())
                except (UnicodeDecodeError, ValueError):
                    bad.add(path, key, "unreadable label: .cls is not an integer")
                    continue
            caption = parts.get("txt", b"").decode("utf-8", errors="replace")[:MAX_CAPTION_CHARS]
            class_name = None
            if "json" in parts:
                try:
                    meta = json.loads(parts["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None
                if isinstance(meta, dict):
                    class_name = meta.get("class_name") if isinstance(meta.get("class_name"), str) else None
                    key = meta["key"] if isinstance(meta.get("key"), str) and meta["key"] else key
            yield Sample(key=key, image=parts[ext], label=label, caption=caption, class_name=class_name, shard=path)


def _row_group_refusal(pf, group: int, limits: dict[str, tuple[str, int]]) -> str | None:
    """Why a Parquet row group is refused unread, from its metadata (``limits``: column ->
    (what, bytes per cell)): its selected columns are over :data:`MAX_ROW_GROUP_BYTES`
    uncompressed, or a column holds more than its per-cell limit times the row count."""
    rg = pf.metadata.row_group(group)
    sizes = {rg.column(i).path_in_schema: rg.column(i).total_uncompressed_size for i in range(rg.num_columns)}
    total = sum(sizes.get(c, 0) for c in limits)
    if total > MAX_ROW_GROUP_BYTES:
        return f"row group too large: {total} bytes uncompressed exceeds the limit of {MAX_ROW_GROUP_BYTES}"
    for column, (what, limit) in limits.items():
        # 4 bytes of length per value and some pages' headers are not the cells' own bytes
        if sizes.get(column, 0) > rg.num_rows * (limit + 4) + (64 << 10):
            return (
                f"{what} too large: column '{column}' holds {sizes[column]} bytes for {rg.num_rows} row(s), "
                f"over the limit of {limit} per cell"
            )
    return None


def _label(v) -> int | None:
    """An integer label (an int, or a float with an integer value), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def iter_parquet(
    uri: str,
    bad: BadSamples,
    image_column: str = "jpg",
    label_column: str | None = "label",
    caption_column: str | None = "caption",
    key_column: str | None = "key",
    check_images: bool = True,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[Sample]:
    """Samples of Parquet files; ``row_groups=(lo, hi)`` reads only those row groups of a single
    file, with the same keys as a whole-file read (default keys count rows from the file's start).
    Row groups and cells over the byte limits of :mod:`datasets_.safety` are bad samples."""
    for path in shard_paths(uri, ".parquet"):
        pf = parquet_file(path)
        names = set(pf.schema_arrow.names)
        image_col = (
            image_column
            if image_column in names
            else next((c for c in ("image", "jpg", "png", "webp") if c in names), None)
        )
        if image_col is None:
            raise DatasetError(
                f"{path}: no image column '{image_column}' (columns: {', '.join(pf.schema_arrow.names)})"
            )
        cols = [c for c in (image_col, label_column, caption_column, key_column) if c and c in names]
        limits = {
            c: lim
            for c, lim in (
                (image_col, ("image", MAX_IMAGE_BYTES)),
                (caption_column, ("caption", MAX_CAPTION_BYTES)),
                (key_column, ("key", MAX_KEY_BYTES)),
                (label_column, ("label", MAX_LABEL_BYTES)),
            )
            if c in cols
        }
        lo, hi = row_groups or (0, pf.metadata.num_row_groups)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
        stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        for group in range(lo, hi):
            refusal = _row_group_refusal(pf, group, limits)
            if refusal:
                for _ in range(pf.metadata.row_group(group).num_rows):
                    bad.add(path, f"{stem}-{row:08d} (row group {group})", refusal)
                    row += 1
                continue
            for batch in pf.iter_batches(columns=cols, batch_size=512, row_groups=[group]):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    key = (
                        str(data[key_column][i])
                        if key_column in data and data[key_column][i] is not None
                        else f"{stem}-{row:08d}"
                    )
                    row += 1
                    blob = data[image_col][i]
                    caption = (data[caption_column][i] or "") if caption_column in data else ""
                    raw_label = data[label_column][i] if label_column in data else None
                    label = None if raw_label is None else _label(raw_label)
                    if not blob:
                        reason = "no image bytes"
                    elif len(key) > MAX_KEY_BYTES:
                        key, reason = key[:64] + "...", f"key too large: over the limit of {MAX_KEY_BYTES}"
                    else:
                        reason = (
                            too_many_bytes("image", len(blob), MAX_IMAGE_BYTES)
                            or too_many_bytes("caption", len(str(caption).encode()), MAX_CAPTION_BYTES)
                            or (
                                None
                                if raw_label is None or label is not None
                                else f"unreadable label: not an integer ({type(raw_label).__name__})"
                            )
                            or (check_image(blob) if check_images else None)
                        )
                    if reason:
                        bad.add(path, key, reason)
                        continue
                    yield Sample(
                        key=key,
                        image=blob,
                        label=label,
                        caption=str(caption)[:MAX_CAPTION_CHARS],
                        shard=path,
                        row_group=group,
                    )


def iter_samples(uri: str, bad: BadSamples, allow_compressed: bool = False, **parquet_columns) -> Iterator[Sample]:
    """Samples of any supported source (local or remote), with bad samples skipped and counted;
    ``allow_compressed`` lets compressed tars be read."""
    fmt = detect_format(uri)
    if fmt == "folder":
        return iter_folder(uri, bad)
    if fmt == "webdataset":
        return iter_webdataset(uri, bad, allow_compressed=allow_compressed)
    if fmt == "parquet":
        return iter_parquet(uri, bad, **parquet_columns)
    raise DatasetError(f"{uri}: already a prepared transferlab dataset")


def peek(iterator: Iterator, n: int) -> tuple[list, Iterator]:
    head = list(itertools.islice(iterator, n))
    return head, itertools.chain(head, iterator)
