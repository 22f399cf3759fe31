"""Where `data prepare` writes and what a manifest may point at: an output folder that is not a
dataset is never deleted, and a manifest names only files inside its own dataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from datasets_ import DatasetError, open_dataset

pytestmark = pytest.mark.timeout(120)
SCRIPT = Path(sys.executable).parent / "transferlab"


def _tar(path: Path) -> Path:
    """A two-sample img2dataset-style tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    with tarfile.open(path, "w") as tar:
        for key, label in (("a", b"0"), ("b", b"1")):
            for ext, data in (("png", buf.getvalue()), ("cls", label)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _prepare(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "data", "prepare", str(src), "--out", str(out), "--test-fraction", "0", *extra],
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_prepare_replaces_only_a_dataset_folder(tmp_path):
    src = _tar(tmp_path / "src" / "00000.tar")
    out = tmp_path / "prepared"
    assert _prepare(src, out).returncode == 0
    first = (out / "manifest.json").read_text()
    proc = _prepare(src, out)  # a dataset: replaced
    assert proc.returncode == 0 and (out / "manifest.json").read_text() == first, proc.stderr
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    proc = _prepare(src, home)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        f"error: {home}: not empty and not a transferlab dataset (no manifest.json); refusing to replace it "
        "(choose a new folder, or empty this one yourself)\n"
    )
    assert (home / "thesis" / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "prepared", "src"]  # no temporary left
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    proc = _prepare(src, notes)
    assert (
        proc.returncode == 2 and proc.stderr == f"error: {notes}: exists and is not a folder; refusing to replace it\n"
    )
    assert notes.read_text() == "keep me"


def _tampered(tmp_path: Path, path: str) -> Path:
    """A prepared dataset whose manifest names ``path`` as a shard."""
    out = tmp_path / "ds"
    assert _prepare(_tar(tmp_path / "src" / "00000.tar"), out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside.parquet", "s3://someone-else/x.parquet"])
def test_a_manifest_naming_files_outside_its_dataset_is_refused(tmp_path, path):
    out = _tampered(tmp_path, path)
    with pytest.raises(DatasetError, match="outside the dataset; refusing to open it"):
        open_dataset(out)


def test_a_remote_manifest_naming_an_absolute_path_is_refused(s3_server, tmp_path):
    import boto3
    import pyarrow.fs as pafs

    out = _tampered(tmp_path, "/etc/passwd")
    boto3.client("s3").create_bucket(Bucket="tampered")
    fs, _ = pafs.FileSystem.from_uri("s3://tampered/x")
    pafs.copy_files(str(out), "tampered/ds", destination_filesystem=fs)
    with pytest.raises(DatasetError, match=r"s3://tampered/ds: the manifest names '/etc/passwd', outside the dataset"):
        open_dataset("s3://tampered/ds")


def test_data_verify_finds_a_shard_changed_since_prepare(tmp_path):
    out = tmp_path / "ds"
    assert _prepare(_tar(tmp_path / "src" / "00000.tar"), out).returncode == 0
    verify = [str(SCRIPT), "data", "verify", str(out)]
    proc = subprocess.run(verify, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and proc.stdout == f"ok: 1 shard(s) of {out} match the SHA-256 of their manifest\n"
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one flipped byte, size unchanged: opening the dataset does not notice
    shard.write_bytes(bytes(data))
    open_dataset(out)
    proc = subprocess.run(verify, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: shard train/part-00000.parquet: SHA-256 ")
    assert proc.stderr.endswith("differs from the manifest's (of 1 shards)\n")


@pytest.mark.parametrize("shard_format", ["parquet", "webdataset"])
def test_a_reader_refuses_a_shard_changed_since_prepare(tmp_path, shard_format):
    """Readers hash each shard on its first read in a process and refuse one whose bytes are not
    those the manifest recorded, naming it; an intact one reads as before."""
    from datasets_.indexed import iter_encoded

    out = tmp_path / "ds"
    assert _prepare(_tar(tmp_path / "src" / "00000.tar"), out, "--format", shard_format).returncode == 0
    assert [k for b in iter_encoded(open_dataset(out), "train") for k in b["key"]] == ["a", "b"]
    (copy := tmp_path / "copy").mkdir()
    for f in out.rglob("*"):  # a second dataset, never read by this process, then tampered with
        if f.is_file():
            (copy / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(out)).write_bytes(f.read_bytes())
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one flipped byte, size unchanged
    shard.write_bytes(bytes(data))
    ds = open_dataset(copy)  # opening checks presence only
    with pytest.raises(DatasetError) as refused:
        list(iter_encoded(ds, "train"))
    message = str(refused.value)
    assert message.startswith(f"{shard}: SHA-256 ") and "\n" not in message, message
    assert message.endswith(
        "differs from the manifest's: the shard changed after `data prepare`; prepare the dataset again"
    )


def test_data_commands_refuse_uris_with_credentials_or_a_query_without_repeating_them(tmp_path):
    secret = "wJalrXUtnFEMIEXAMPLEKEY"
    cases = [
        (
            ["prepare", f"s3://AKIAEXAMPLE:{secret}@bucket/src", "--out", str(tmp_path / "o")],
            "SRC: must not carry credentials",
        ),
        (
            ["prepare", "builtin:digits", "--out", "s3://b/o?endpoint_override=evil.example"],
            "--out: must not carry a query",
        ),
        (["inspect", "s3://b/x?endpoint_override=evil.example"], "DIR_OR_URI: must not carry a query"),
        (["verify", f"gs://u:{secret}@b/ds"], "DIR_OR_URI: must not carry credentials"),
    ]
    for args, expect in cases:
        proc = subprocess.run([str(SCRIPT), "data", *args], capture_output=True, text=True, timeout=100)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {expect}"), proc.stderr
        assert proc.stderr.count("\n") == 1 and secret not in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()
