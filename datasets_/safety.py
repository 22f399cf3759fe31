"""Limits for data built by someone else: web shards are untrusted input.

- **Pixels**: PIL's decompression-bomb limit is set here, explicitly, to :data:`MAX_IMAGE_PIXELS`
  (PIL's own default is a warning at 89 MP and an error only at twice that). A larger declared
  size is a bad sample before a single pixel is decoded.
- **Tar members**: only regular files with a relative name and no ``..`` become samples.
  Members are never extracted to disk; absolute or ``..`` names, symlinks, hard links, devices
  and FIFOs are counted as bad samples and never opened or followed.
- **Text**: captions are truncated to :data:`MAX_CAPTION_CHARS` (a caption is still useful
  cut short; rejecting the image for it would bias the data towards short captions). JSON
  metadata larger than :data:`MAX_METADATA_BYTES` is ignored (it only supplies class names).
"""

from __future__ import annotations

import posixpath
import tarfile

from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000  # far above any training image; a 64 MP RGB image is 192 MB decoded
MAX_CAPTION_CHARS = 2048
MAX_METADATA_BYTES = 1 << 20

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_KIND = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


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


def too_many_pixels(img: Image.Image) -> str | None:
    """The reason an opened (not yet decoded) image is refused for its declared size, or None."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        return f"image too large: {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}"
    return None
