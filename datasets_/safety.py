"""Limits for data built by someone else: web shards are untrusted input.

- **Pixels**: PIL's decompression-bomb limit is set here, explicitly, to :data:`MAX_IMAGE_PIXELS`
  (PIL's own default is a warning at 89 MP and an error only at twice that). A larger declared
  size is a bad sample before a single pixel is decoded.
- **Tar members**: only regular files with a relative name and no ``..`` become samples.
  Members are never extracted to disk; absolute or ``..`` names, symlinks, hard links, devices
  and FIFOs are counted as bad samples and never opened or followed.
- **Text**: captions are truncated to :data:`MAX_CAPTION_CHARS` (a caption is still useful
  cut short; rejecting the image for it would bias the data towards short captions). JSON
  metadata larger than :data:`MAX_METADATA_BYTES` is ignored, never read (it only supplies
  class names).
- **Bytes, before reading**: an image file, object, tar member or Parquet cell over
  :data:`MAX_IMAGE_BYTES`, and a caption over :data:`MAX_CAPTION_BYTES` (no caption is that
  long: it is junk or an attack), are bad samples, refused from their declared size (tar header,
  ``stat``, object listing, Parquet row-group metadata) before a byte of them is read. Tar
  members of other kinds are skipped unread. A Parquet row group is read whole, so one whose
  selected columns hold more than :data:`MAX_ROW_GROUP_BYTES` uncompressed, or more than the
  per-cell limit times its row count (some cell must then be over it), is refused unread; a
  cell over its limit in a row group under both is refused once read.
- **Compressed tars** (gzip, bzip2, xz) are refused unless the source allows them
  (``allow_compressed``): a few kB of gzip can hold gigabytes. When allowed, they are
  decompressed as a stream and the limits above still hold, member by member.

Every byte limit can be raised (or lowered) by the environment variable of its name prefixed
with ``TRANSFERLAB_`` (``TRANSFERLAB_MAX_IMAGE_BYTES=67108864``), read when this module is
imported (Ray workers of a local cluster inherit it; on a remote cluster set it in the cluster's
environment).
"""

from __future__ import annotations

import os
import posixpath
import tarfile

from PIL import Image


def _limit(name: str, default: int) -> int:
    value = os.environ.get(f"TRANSFERLAB_{name}")
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"TRANSFERLAB_{name}: must be an integer number of bytes, got {value[:40]!r}") from None
    if limit < 1:
        raise ValueError(f"TRANSFERLAB_{name}: must be >= 1, got {limit}")
    return limit


MAX_IMAGE_PIXELS = 64_000_000  # far above any training image; a 64 MP RGB image is 192 MB decoded
MAX_CAPTION_CHARS = 2048
MAX_METADATA_BYTES = _limit("MAX_METADATA_BYTES", 1 << 20)
MAX_IMAGE_BYTES = _limit("MAX_IMAGE_BYTES", 32 << 20)  # a 64 MP JPEG is ~10-20 MB
MAX_CAPTION_BYTES = _limit("MAX_CAPTION_BYTES", 64 << 10)  # 32 x MAX_CAPTION_CHARS of 1-byte UTF-8
MAX_LABEL_BYTES = 64  # a .cls member holds one integer
MAX_KEY_BYTES = 4096  # a Parquet key cell
MAX_ROW_GROUP_BYTES = _limit("MAX_ROW_GROUP_BYTES", 1 << 30)
# What a reader decodes: an image in any other format PIL knows is a bad sample.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_KIND = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


MAX_TAR_HEADER_BYTES = 1 << 20  # a PAX or GNU long-name header: names and a few attributes


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses PAX and GNU long-name extension headers over
    :data:`MAX_TAR_HEADER_BYTES`: tarfile reads those whole, before the member they describe, so
    a size check on the member would come too late (``tarfile.open(..., tarinfo=BoundedTarInfo)``)."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X")
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes exceeds the limit of {MAX_TAR_HEADER_BYTES}"
            )
        return super()._proc_member(tarfile_)


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read (None: a regular file with a safe relative name).
    Directories return "" : harmless, and skipped without being counted."""
    if member.isdir():
        return ""
    if not member.isreg():
        target = f" to {member.linkname}" if member.issym() or member.islnk() else ""
        return f"unsafe tar member: {_KIND.get(member.type, 'special file')}{target}"
    name = member.name
    if name.startswith("/") or "\\" in name or "\0" in name or (len(name) > 1 and name[1] == ":"):
        return "unsafe tar member: absolute or non-POSIX path"
    if ".." in posixpath.normpath(name).split("/") or ".." in name.split("/"):
        return "unsafe tar member: path with '..'"
    return None


def compression(head: bytes) -> str | None:
    """``gzip``, ``bzip2``, ``xz`` or ``zstd`` from the first bytes of a file, None if none of them."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


def too_many_bytes(what: str, size: int, limit: int) -> str | None:
    """The reason ``size`` bytes of ``what`` (``image``, ``caption``) are refused unread, or None."""
    if size > limit:
        return f"{what} too large: {size} bytes exceeds the limit of {limit}"
    return None


def too_many_pixels(img: Image.Image) -> str | None:
    """The reason an opened (not yet decoded) image is refused for its declared size, or None."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        return f"image too large: {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}"
    return None
