"""Untrusted shards: each test crafts one hostile file (tar, Parquet, folder or prepared dataset)
and checks that it becomes a counted bad sample or a clear error — never a file written outside
the output folder, a link followed, or a bomb decoded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_ import DatasetError, write_sharded_dataset
from datasets_.pipeline import decode_uint8
from datasets_.prepare import prepare
from datasets_.readers import BadSamples, iter_samples
from datasets_.safety import MAX_CAPTION_BYTES, MAX_CAPTION_CHARS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

pytestmark = pytest.mark.timeout(60)


def _png(size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A 9,000 x 9,000 PNG (81 MP > the 64 MP limit) that compresses to a few kB."""
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _shard(tmp_path, hostile):
    """A shard with two good samples around the hostile members ``hostile(tar)`` adds."""
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        _add(tar, "good0.png", _png())
        _add(tar, "good0.cls", b"0")
        hostile(tar)
        _add(tar, "good1.png", _png())
        _add(tar, "good1.cls", b"1")
    return path


def _read(path, **kw):
    bad = BadSamples()
    return list(iter_samples(str(path), bad, **kw)), bad


def _prepare_writes_only_inside(tmp_path, shard, forbidden):
    """`data prepare` of the shard writes its output folder and nothing else; ``forbidden`` (where
    an extraction would have written) stays absent."""
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "prepared"
    ds, bad = prepare(str(shard), str(out), test_fraction=0.0)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p == out or out in p.parents for p in new), sorted(map(str, new))
    assert not forbidden.exists()
    return ds, bad


def test_absolute_member_path_is_a_bad_sample_and_never_written(tmp_path):
    target = tmp_path / "escaped-absolute.png"
    shard = _shard(tmp_path, lambda tar: _add(tar, str(target), _png()))
    samples, bad = _read(shard)
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"unsafe tar member": 1}
    _, bad = _prepare_writes_only_inside(tmp_path, shard, target)
    assert bad.total == 1


def test_dotdot_member_path_is_a_bad_sample_and_never_written(tmp_path):
    shard = _shard(tmp_path, lambda tar: _add(tar, "../../escaped-dotdot.png", _png()))
    samples, bad = _read(shard)
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"unsafe tar member": 1}
    assert "path with '..'" in bad.examples[0]
    _prepare_writes_only_inside(tmp_path, shard, tmp_path.parent / "escaped-dotdot.png")


def test_symlink_member_is_never_followed(tmp_path):
    shard = _shard(tmp_path, lambda tar: _add(tar, "evil.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"))
    samples, bad = _read(shard)
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.examples[0].endswith("unsafe tar member: symlink to /etc/passwd")


def test_hardlink_member_is_never_followed(tmp_path):
    def hostile(tar):
        _add(tar, "evil.png", kind=tarfile.LNKTYPE, linkname="good0.png")  # would read another member
        _add(tar, "evil2.png", kind=tarfile.LNKTYPE, linkname="/etc/shadow")

    samples, bad = _read(_shard(tmp_path, hostile))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"unsafe tar member": 2} and "hard link to /etc/shadow" in bad.examples[1]


def test_device_and_fifo_members_are_never_opened(tmp_path):
    def hostile(tar):
        _add(tar, "zero.png", kind=tarfile.CHRTYPE)
        _add(tar, "disk.png", kind=tarfile.BLKTYPE)
        _add(tar, "pipe.png", kind=tarfile.FIFOTYPE)

    samples, bad = _read(_shard(tmp_path, hostile))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"unsafe tar member": 3}
    assert [e.rsplit(": ", 1)[1] for e in bad.examples] == ["character device", "block device", "FIFO"]


def test_decompression_bomb_in_a_tar_is_a_bad_sample(tmp_path):
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's limit is set explicitly, not PIL's default
    samples, bad = _read(_shard(tmp_path, lambda tar: _add(tar, "bomb.png", _bomb())))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"image too large": 1}


def test_decompression_bomb_in_parquet_is_a_bad_sample(tmp_path):
    pq.write_table(pa.table({"key": ["ok", "bomb"], "jpg": [_png(), _bomb()], "label": [0, 1]}), tmp_path / "p.parquet")
    samples, bad = _read(tmp_path / "p.parquet")
    assert [s.key for s in samples] == ["ok"] and bad.counts == {"image too large": 1}


def test_bomb_inside_someone_elses_prepared_dataset_is_refused_at_decode(tmp_path):
    """A prepared dataset built elsewhere never went through our readers: decoding checks too."""
    ds = write_sharded_dataset(
        tmp_path / "ds", "ds", ["a"], [("train", {"key": "b", "image": _bomb(), "label": 0, "caption": ""})]
    )
    blob = pq.read_table(ds.files("train")[0]).column("image")[0].as_py()
    with pytest.raises(DatasetError, match="image too large: 9000x9000"):
        decode_uint8([_png(), blob], 16)


def test_non_image_bytes_with_an_image_extension_are_bad_samples(tmp_path):
    def hostile(tar):
        _add(tar, "script.jpg", b"#!/bin/sh\nrm -rf /\n")
        _add(tar, "html.png", b"<html><script>alert(1)</script></html>")
        _add(tar, "truncated.png", _png()[:40])

    samples, bad = _read(_shard(tmp_path, hostile))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"undecodable image": 3}


def test_oversized_caption_is_truncated(tmp_path):
    def hostile(tar):
        _add(tar, "long.png", _png())
        _add(tar, "long.txt", b"x" * 60_000)  # long, yet under the 64 KiB limit of a caption

    samples, bad = _read(_shard(tmp_path, hostile))
    long = next(s for s in samples if s.key == "long")
    assert len(long.caption) == MAX_CAPTION_CHARS and bad.total == 0


def test_oversized_parquet_caption_is_truncated(tmp_path):
    pq.write_table(
        pa.table({"key": ["k"], "jpg": [_png()], "label": [0], "caption": ["y" * 60_000]}), tmp_path / "p.parquet"
    )
    samples, _ = _read(tmp_path / "p.parquet")
    assert len(samples[0].caption) == MAX_CAPTION_CHARS


def test_caption_over_the_byte_limit_is_refused_unread(tmp_path):
    def hostile(tar):
        _add(tar, "huge.png", _png())
        _add(tar, "huge.txt", b"x" * (5 << 20))  # 5 MB: no caption is that long

    samples, bad = _read(_shard(tmp_path, hostile))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"caption too large": 1} and f"exceeds the limit of {MAX_CAPTION_BYTES}" in bad.examples[0]
    # Parquet: a one-row group is refused from its metadata; in a row group of many small
    # captions the big one is refused once read
    pq.write_table(pa.table({"key": ["k"], "jpg": [_png()], "caption": ["y" * (1 << 20)]}), tmp_path / "one.parquet")
    samples, bad = _read(tmp_path / "one.parquet")
    assert samples == [] and bad.counts == {"caption too large": 1} and "column 'caption' holds" in bad.examples[0]
    captions = ["short"] * 99 + ["y" * (1 << 20)]
    table = pa.table({"key": [f"k{i}" for i in range(100)], "jpg": [_png()] * 100, "caption": captions})
    pq.write_table(table, tmp_path / "many.parquet")
    samples, bad = _read(tmp_path / "many.parquet")
    assert len(samples) == 99 and bad.counts == {"caption too large": 1} and "k99" in bad.examples[0]


def test_image_over_the_byte_limit_is_refused_unread(tmp_path):
    """A 33 MiB "image" as a folder file (sparse: nothing to read but its size), a tar member
    and a Parquet cell: refused from stat, the tar header and the row group's metadata."""
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(_png())
    with open(root / "cat" / "big.png", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + (1 << 20))
    samples, bad = _read(root)
    assert [s.key for s in samples] == ["cat/a"] and bad.counts == {"image too large": 1}
    assert f"{MAX_IMAGE_BYTES + (1 << 20)} bytes exceeds the limit of {MAX_IMAGE_BYTES}" in bad.examples[0]
    samples, bad = _read(_shard(tmp_path, lambda tar: _add(tar, "big.png", bytes(MAX_IMAGE_BYTES + 1))))
    assert [s.key for s in samples] == ["good0", "good1"] and bad.counts == {"image too large": 1}
    pq.write_table(pa.table({"key": ["big"], "jpg": [bytes(MAX_IMAGE_BYTES + (1 << 20))]}), tmp_path / "p.parquet")
    samples, bad = _read(tmp_path / "p.parquet")
    assert samples == [] and bad.counts == {"image too large": 1} and "column 'jpg' holds" in bad.examples[0]


class _Zeros(io.RawIOBase):
    """``n`` bytes of ``x``, produced as they are read (the test never holds them whole)."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, buf):
        k = min(len(buf), self.left)
        buf[:k] = b"x" * k
        self.left -= k
        return k


def _gzip_shard(tmp_path, caption_bytes=0):
    path = tmp_path / "gz" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        _add(tar, "good0.png", _png())
        _add(tar, "good0.cls", b"0")
        if caption_bytes:
            _add(tar, "bomb.png", _png())
            info = tarfile.TarInfo("bomb.txt")
            info.size = caption_bytes
            tar.addfile(info, io.BufferedReader(_Zeros(caption_bytes)))
    return path


def test_compressed_tar_is_refused_unless_allowed(tmp_path):
    shard = _gzip_shard(tmp_path)
    samples, bad = _read(shard)
    assert samples == [] and bad.counts == {"compressed tar refused": 1}
    assert "allow_compressed: true" in bad.examples[0]
    samples, bad = _read(shard, allow_compressed=True)
    assert [s.key for s in samples] == ["good0"] and bad.total == 0
    script = Path(sys.executable).parent / "transferlab"
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(script), "data", "prepare", str(shard), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no usable samples (1 bad, compressed tar refused x1" in proc.stderr and not out.exists()
    assert "compressed tar refused: gzip; allow it with allow_compressed: true (--allow-compressed)" in proc.stderr
    proc = subprocess.run(
        [str(script), "data", "prepare", str(shard), "--out", str(out), "--allow-compressed"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "1 samples" in proc.stdout, proc.stderr


def test_gzip_bomb_is_refused_from_its_tar_header_in_bounded_memory(tmp_path):
    """A ~130 kB gzip tar holding a 128 MB caption, allowed in: the member is refused from its
    header and skipped as a stream; the process grows by far less than the caption."""
    shard = _gzip_shard(tmp_path, caption_bytes=128 << 20)
    assert shard.stat().st_size < 1 << 20
    code = (
        "import resource, sys\n"
        "from datasets_.prepare import prepare\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"ds, bad = prepare({str(shard)!r}, {str(tmp_path / 'out')!r}, test_fraction=0.0, allow_compressed=True)\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps([ds.num_samples('train'), bad.counts, grew // 1024]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples, counts, grew_mb = json.loads(proc.stdout)
    assert samples == 1 and counts == {"caption too large": 1}, proc.stdout
    assert grew_mb < 80, proc.stdout  # MB (33 measured); reading the caption whole adds 128


def test_images_in_formats_the_readers_do_not_read_are_bad_samples(tmp_path):
    def encoded(fmt):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        return buf.getvalue()

    def hostile(tar):
        for fmt in ("GIF", "BMP", "TIFF"):
            _add(tar, f"{fmt.lower()}.png", encoded(fmt))

    samples, bad = _read(_shard(tmp_path, hostile))
    assert [s.key for s in samples] == ["good0", "good1"]
    assert bad.counts == {"undecodable image": 3} and all("not a JPEG, PNG or WebP" in e for e in bad.examples)


def test_non_integer_parquet_labels_are_bad_samples(tmp_path):
    labels = pa.array(["0", "seven", "1.5", "2"])
    pq.write_table(pa.table({"key": list("abcd"), "jpg": [_png()] * 4, "label": labels}), tmp_path / "s.parquet")
    samples, bad = _read(tmp_path / "s.parquet")
    assert samples == [] and bad.counts == {"unreadable label": 4}
    floats = pa.array([0.0, 1.5, 2.0])
    pq.write_table(pa.table({"key": list("abc"), "jpg": [_png()] * 3, "label": floats}), tmp_path / "f.parquet")
    samples, bad = _read(tmp_path / "f.parquet")
    assert [(s.key, s.label) for s in samples] == [("a", 0), ("c", 2)] and bad.counts == {"unreadable label": 1}


def test_oversized_metadata_is_ignored(tmp_path):
    def hostile(tar):
        _add(tar, "meta.png", _png())
        _add(tar, "meta.cls", b"0")
        _add(tar, "meta.json", json.dumps({"class_name": "evil", "pad": "z" * (2 << 20)}).encode())

    samples, bad = _read(_shard(tmp_path, hostile))
    meta = next(s for s in samples if s.key == "meta")
    assert meta.class_name is None and meta.label == 0 and bad.total == 0


def test_symlinked_class_folder_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png())
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(_png())
    os.symlink(outside, root / "dog")
    samples, _ = _read(root)
    assert [s.key for s in samples] == ["cat/a"]


def test_escaping_symlink_to_a_file_in_a_folder_is_not_read(tmp_path):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(_png())
    os.symlink("/etc/hostname", root / "cat" / "b.png")
    os.mkfifo(root / "cat" / "c.png")  # reading a FIFO would block forever
    samples, _ = _read(root)
    assert [s.key for s in samples] == ["cat/a"]


def test_non_image_labels_and_keys_do_not_break_prepare(tmp_path):
    def hostile(tar):
        _add(tar, "neg.png", _png())
        _add(tar, "neg.cls", b"-7")
        _add(tar, "word.png", _png())
        _add(tar, "word.cls", b"seven")

    ds, bad = prepare(str(_shard(tmp_path, hostile)), str(tmp_path / "out"), test_fraction=0.0)
    assert ds.num_samples("train") == 2
    assert bad.counts == {"unreadable label": 1, "label out of range": 1}


def test_every_attack_is_in_the_reliability_table():
    from reliability_table import SHARD_ATTACKS  # tests/ is on sys.path (rootdir conftest)

    tests = {
        name
        for name in globals()
        if name.startswith("test_") and name != "test_every_attack_is_in_the_reliability_table"
    }
    assert set(SHARD_ATTACKS) == tests
    assert np.all([len(v) == 2 for v in SHARD_ATTACKS.values()])


def test_a_study_source_reads_a_compressed_tar_only_when_it_allows_it(tmp_path, monkeypatch):
    """``allow_compressed: true`` on a source travels from the study file to the scan and to the
    reads of training (the scan's read units), and is part of the scan's cache key."""
    from datasets_.indexed import iter_encoded
    from datasets_.prepare import resolve_dataset
    from orchestrator.spec import load_spec

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    shard = _gzip_shard(tmp_path)
    study = tmp_path / "study.yaml"
    body = (
        "study: gz\nsources:\n  web:\n    uri: {uri}\n{extra}tasks:\n  digits: builtin:digits\n"
        "pretrain:\n  sweep:\n    pretrain_size: [1]\ntransfer:\n  shots: [1]\n"
    )
    study.write_text(body.format(uri=shard, extra=""))
    ref = load_spec(study).sources["web"]
    assert ref.columns == {}
    with pytest.raises(DatasetError, match="no usable samples .*compressed tar refused: gzip; allow it with"):
        resolve_dataset(ref.uri, **ref.columns)
    study.write_text(body.format(uri=shard, extra="    allow_compressed: true\n"))
    ref = load_spec(study).sources["web"]
    assert ref.columns == {"allow_compressed": True}
    ds = resolve_dataset(ref.uri, **ref.columns)
    batches = list(iter_encoded(ds, "train"))
    assert [k for b in batches for k in b["key"]] == ["good0"] and batches[0]["image"][0] == _png()


def test_byte_limits_are_overridden_by_the_environment(tmp_path):
    def hostile(tar):
        _add(tar, "mid.png", _png())
        _add(tar, "mid.txt", b"x" * 200)

    shard = _shard(tmp_path, hostile)
    code = (
        "import json, sys\n"
        "from datasets_.readers import BadSamples, iter_samples\n"
        "bad = BadSamples()\n"
        "print(json.dumps([[s.key for s in iter_samples(sys.argv[1], bad)], bad.counts]))\n"
    )
    env = {**os.environ, "TRANSFERLAB_MAX_CAPTION_BYTES": "100"}
    proc = subprocess.run([sys.executable, "-c", code, str(shard)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["good0", "good1"], {"caption too large": 1}]
    env["TRANSFERLAB_MAX_CAPTION_BYTES"] = "lots"
    proc = subprocess.run([sys.executable, "-c", code, str(shard)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "TRANSFERLAB_MAX_CAPTION_BYTES: must be an integer number of bytes" in proc.stderr


def test_oversized_pax_header_stops_the_shard_before_it_is_read(tmp_path):
    """tarfile reads a PAX extension header whole before the member it describes: one of 5 MB
    ends the shard, as a corrupt tar does (samples grouped before it are kept), instead of being read."""
    path = tmp_path / "shards" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "good0.png", _png())
        _add(tar, "good1.png", _png())
        info = tarfile.TarInfo("padded.png")
        info.size, info.pax_headers = len(_png()), {"comment": "x" * (5 << 20)}
        tar.addfile(info, io.BytesIO(_png()))
        _add(tar, "good2.png", _png())
    samples, bad = _read(path)
    assert [s.key for s in samples] == ["good0"]  # good1 was still being grouped: dropped with the rest
    assert bad.counts == {"truncated or corrupt tar": 1} and "extended header of" in bad.examples[0]


def test_oversized_object_in_a_remote_image_folder_is_refused_from_the_listing(s3_server):
    """On an object store the size comes from the one listing of the prefix: no GET of the object."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bigimages")
    s3.put_object(Bucket="bigimages", Key="folder/cat/a.png", Body=_png())
    s3.put_object(Bucket="bigimages", Key="folder/cat/big.png", Body=bytes(MAX_IMAGE_BYTES + 1))
    samples, bad = _read("s3://bigimages/folder")
    assert [s.key for s in samples] == ["cat/a"] and bad.counts == {"image too large": 1}
    assert f"{MAX_IMAGE_BYTES + 1} bytes exceeds the limit" in bad.examples[0]
