"""Checks of the infrastructure a study needs, made before any compute starts.

Each raises ``ValueError`` with a one-line reason (the CLI prefixes the field and exits 2):
the tracking server must answer, and the storage path must take a write. A checkpoint that a
later phase needs is looked up with :func:`checkpoint_exists`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from datasets_.objstore import filesystem
from orchestrator.records.credentials import split_credentials
from orchestrator.records.retry import redact

PROBE_BYTES = 1 << 16  # a storage path that cannot take 64 KiB cannot take a checkpoint


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """An HTTP tracking server must answer ``/health``; a sqlite store's folder must exist and be
    writable. Nothing is created."""
    if uri.startswith(("http://", "https://")):
        import requests

        clean, creds = split_credentials(uri)
        try:
            r = requests.get(clean.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as e:
            reason = "connection refused" if "refused" in str(e).lower() else type(e).__name__
            raise ValueError(f"cannot reach the MLflow tracking server at {redact(uri)} ({reason})") from None
        if r.status_code >= 500:
            raise ValueError(f"the MLflow tracking server at {redact(uri)} answers HTTP {r.status_code}")
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        target = db if db.exists() else db.parent
        if not target.exists():
            raise ValueError(f"folder {db.parent} of the sqlite store does not exist")
        if not os.access(target, os.W_OK):
            raise ValueError(f"{target} is not writable")


def check_storage(storage: str) -> None:
    """Create the storage folder if needed and write, sync and delete a probe file in it.

    Catches read-only and full file systems (and missing permissions) before any compute.
    Object-store URIs are checked the same way through pyarrow's filesystems.
    """
    import pyarrow.fs as pafs

    try:
        fs, base = filesystem(storage)
        fs.create_dir(base, recursive=True)
        probe = f"{base.rstrip('/')}/.transferlab-probe-{uuid.uuid4().hex}"
        if isinstance(fs, pafs.LocalFileSystem):
            # pyarrow buffers local writes; a real fsync is what surfaces ENOSPC.
            with open(probe, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open_output_stream(probe) as f:
                f.write(b"\0" * PROBE_BYTES)
        fs.delete_file(probe)
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot write to {redact(storage)} ({reason})") from None


def checkpoint_exists(uri: str) -> bool:
    """Whether a checkpoint directory (local path or object-store URI) is still there."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        info = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return False
    return any(i.type == pafs.FileType.File for i in info)
