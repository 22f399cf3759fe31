"""Storage that cannot take a checkpoint — mounted read-only, or full — is refused before any
compute: exit 2, one line naming the storage path and the OS's reason, nothing written to MLflow.

The file systems are real: a tmpfs mounted in a private user + mount namespace (``unshare -rm``),
so the test needs no privileges on the machine and changes nothing outside its process tree.
(The third storage fault, a deleted checkpoint folder, is in tests/test_outages.py.)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(180)

SPEC = {
    "study": "storage-faults",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {"model": "tiny-cnn", "image_size": 16, "epochs": 1, "sweep": {"pretrain_size": [100]}},
    "transfer": {"shots": [1], "seeds": [0]},
}


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(), reason="unshare -rm (user + mount namespaces) is not available here"
)


def _run_on_mounted_storage(tmp_path: Path, mount_options: str, remount_ro: bool) -> subprocess.CompletedProcess:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(SPEC))
    storage = tmp_path / "storage"
    storage.mkdir()
    cli = [
        str(Path(sys.executable).parent / "transferlab"),
        "run",
        str(study),
        "--storage-path",
        str(storage / "checkpoints"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    script = f"mount -t tmpfs -o {mount_options} tmpfs {shlex.quote(str(storage))}"
    if remount_ro:
        script += f" && mount -o remount,ro {shlex.quote(str(storage))}"
    script += " && exec " + shlex.join(cli)
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=150,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _assert_refused(proc, tmp_path: Path, reason: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --storage-path: cannot write to {tmp_path / 'storage' / 'checkpoints'}"), (
        proc.stderr
    )
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storage", "study.yaml"]


@needs_namespaces
def test_read_only_storage_is_refused_before_compute(tmp_path):
    proc = _run_on_mounted_storage(tmp_path, "size=1m", remount_ro=True)
    _assert_refused(proc, tmp_path, "Read-only file system")


@needs_namespaces
def test_full_storage_is_refused_before_compute(tmp_path):
    proc = _run_on_mounted_storage(tmp_path, "size=16k", remount_ro=False)
    _assert_refused(proc, tmp_path, "No space left on device")
