"""Raw sources on an S3-compatible object store (moto's real server on loopback), read as they
are: an image folder prefix with train/val splits, img2dataset tars by brace pattern and by
prefix, and one big Parquet file of several row groups with its own column names. Each must give
the same samples as the same files on disk, through `data inspect`, `data prepare` and Ray Data;
a WebDataset prepared dataset round-trips through S3; missing URIs are one-line errors. (A study
pretraining on raw S3 tars is in tests/test_s3.py, sharing that file's study run.)"""

import io
import json
import tarfile

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from datasets_ import DatasetError, open_dataset, resolve_dataset
from datasets_.indexed import iter_encoded, iter_unit, read_units
from datasets_.prepare import inspect
from orchestrator.cli import main

pytestmark = pytest.mark.timeout(300)
BUCKET = "raw-sources"
PQ_COLUMNS = {"image_column": "img", "label_column": "y", "caption_column": "text", "key_column": "uid"}
PQ_FLAGS = ["--image-column", "img", "--label-column", "y", "--caption-column", "text", "--key-column", "uid"]


def _digits(n):
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(np.round(d.images[i] * 255 / 16).astype(np.uint8), int(d.target[i])) for i in range(n)]


def _encode(img, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB" if fmt == "JPEG" else "L").save(buf, format=fmt)
    return buf.getvalue()


def _write_sources(root):
    """imgs/{train,val}/<class>/*.jpg|png (60), laion/0000{0,1,2}.tar (300), pq/big.parquet (600
    rows in 4 row groups, columns uid/img/y/text)."""
    digits = _digits(600)
    for i, (img, y) in enumerate(digits[:60]):
        d = root / "imgs" / ("val" if i % 4 == 0 else "train") / f"digit_{y % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.{'jpg' if i % 2 else 'png'}").write_bytes(_encode(img, "JPEG" if i % 2 else "PNG"))
    (root / "laion").mkdir()
    for shard in range(3):
        with tarfile.open(root / "laion" / f"{shard:05d}.tar", "w") as tar:
            for j in range(100):
                img, y = digits[shard * 100 + j]
                key = f"{shard:05d}{j:04d}"
                for ext, data in (
                    ("jpg", _encode(img, "JPEG")),
                    ("txt", f"a handwritten {y}".encode()),
                    ("cls", str(y % 4).encode()),
                    ("json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "pq").mkdir()
    table = pa.table(
        {
            "uid": [f"u{i:04d}" for i in range(600)],
            "img": [_encode(x) for x, _ in digits],
            "y": [y % 5 for _, y in digits],
            "text": [f"digit {y}" for _, y in digits],
        }
    )
    pq.write_table(table, root / "pq" / "big.parquet", row_group_size=150)


@pytest.fixture(scope="module")
def sources(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    _write_sources(root)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/x")
    for name in ("imgs", "laion", "pq"):
        pafs.copy_files(str(root / name), f"{BUCKET}/{name}", destination_filesystem=fs)
    return root


def _samples(ds) -> list[tuple]:
    return [
        (split, k, img, int(y), c)
        for split in ds.manifest["splits"]
        for b in iter_encoded(ds, split, columns=("key", "image", "label", "caption"))
        for k, img, y, c in zip(b["key"], b["image"], b["label"], b["caption"])
    ]


def test_raw_sources_on_s3_inspect_and_prepare_as_on_disk(sources, tmp_path, capsys):
    cases = [  # (remote, local, format, samples, flags)
        (f"s3://{BUCKET}/imgs", sources / "imgs", "folder", 60, []),
        (f"s3://{BUCKET}/laion/{{00000..00002}}.tar", sources / "laion" / "{00000..00002}.tar", "webdataset", 300, []),
        (f"s3://{BUCKET}/laion/", sources / "laion", "webdataset", 300, []),
        (f"s3://{BUCKET}/pq", sources / "pq", "parquet", 600, PQ_FLAGS),
    ]
    manifests = {}
    for i, (uri, local, fmt, n, flags) in enumerate(cases):
        capsys.readouterr()
        assert main(["data", "inspect", uri, "--json", *flags]) == 0, uri
        m = json.loads(capsys.readouterr().out)
        on_disk = inspect(str(local), **(PQ_COLUMNS if flags else {}))
        assert (m["prepared"], m["source_format"], m["num_samples"], m["bad_samples"]["total"]) == (False, fmt, n, 0), (
            uri
        )
        assert m["content_fingerprint"] == on_disk["content_fingerprint"] and m["splits"] == on_disk["splits"], uri
        manifests[fmt] = manifests.get(fmt, m)
        if i == 2:
            continue  # the same tars as the brace pattern: inspecting them is enough
        assert main(["data", "prepare", uri, "--out", str(tmp_path / f"out{i}"), *flags]) == 0, uri
        assert open_dataset(tmp_path / f"out{i}").manifest["content_fingerprint"] == m["content_fingerprint"], uri
    # The folder's own train/ and val/ splits; class names are the class prefixes.
    assert (m_folder := manifests["folder"])["splits"]["test"]["num_samples"] == 15
    assert m_folder["classes"] == ["digit_0", "digit_1", "digit_2"]
    # A changed object changes the scan key: a new scan, and the old one is refused.
    first = resolve_dataset(f"s3://{BUCKET}/imgs")
    assert resolve_dataset(f"s3://{BUCKET}/imgs").root == first.root
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/x")
    with fs.open_output_stream(f"{BUCKET}/imgs/train/digit_0/003.jpg") as f:
        f.write(_encode(np.zeros((12, 12), np.uint8), "JPEG"))
    second = resolve_dataset(f"s3://{BUCKET}/imgs")
    assert second.root != first.root and second.num_samples("train") == first.num_samples("train")
    with pytest.raises(DatasetError, match="003.jpg: changed since s3://"):
        open_dataset(first.root)
    pafs.copy_files(
        str(sources / "imgs/train/digit_0/003.jpg"), f"{BUCKET}/imgs/train/digit_0/003.jpg", destination_filesystem=fs
    )


def test_webdataset_dataset_on_s3_round_trip(ray_cluster, sources, tmp_path):
    from datasets_.pipeline import ray_dataset

    uri = f"s3://{BUCKET}/prepared/wds"
    assert (
        main(["data", "prepare", f"s3://{BUCKET}/imgs", "--out", uri, "--format", "webdataset", "--shard-size", "16"])
        == 0
    )
    assert (
        main(
            [
                "data",
                "prepare",
                str(sources / "imgs"),
                "--out",
                str(tmp_path / "wds"),
                "--format",
                "webdataset",
                "--shard-size",
                "16",
            ]
        )
        == 0
    )
    remote, local = open_dataset(uri), open_dataset(tmp_path / "wds")
    assert remote.format == "webdataset" and remote.files("train")[0] == f"{uri}/train/part-00000.tar"
    assert remote.fingerprint == local.fingerprint  # byte-identical tars from the bucket and from disk
    assert _samples(remote) == _samples(local)
    assert resolve_dataset(uri).fingerprint == remote.fingerprint
    batches = list(ray_dataset(remote, "train", image_size=8).iter_batches(batch_size=None, batch_format="numpy"))
    assert sum(len(b["label"]) for b in batches) == remote.num_samples("train") == 45
    assert {b["image"].shape[1:] for b in batches} == {(3, 8, 8)}


def test_one_big_parquet_file_is_read_in_row_group_units(ray_cluster, sources):
    from datasets_.pipeline import decode_uint8, ray_dataset

    ds = resolve_dataset(f"s3://{BUCKET}/pq", **PQ_COLUMNS)
    assert ds.files("train") == [f"s3://{BUCKET}/pq/big.parquet"]
    whole = read_units(ds, "train", samples_per_unit=10**9)
    assert [u["row_groups"] for u in whole] == [[0, 4]]
    per_group, split = read_units(ds, "train", samples_per_unit=1), read_units(ds, "train")
    assert [u["row_groups"] for u in per_group] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert len(split) > len(ds.files("train")) and split[0]["row_groups"][0] == 0 and split[-1]["row_groups"][1] == 4
    # The same samples, in the same order, whichever way the file is cut.
    reads = [
        [
            (k, img, y, c)
            for u in units
            for b in iter_unit(u, batch_size=64)
            for k, img, y, c in zip(b["key"], b["image"], b["label"], b["caption"])
        ]
        for units in (whole, per_group, split)
    ]
    assert reads[0] == reads[1] == reads[2] and [r[0] for r in reads[0]] == list(ds.keys_and_labels("train").keys)
    # Ray Data reads one unit per task, every indexed sample once, decoded as in this process.
    got = [
        (int(y), img.tobytes())
        for b in ray_dataset(ds, "train", image_size=8).iter_batches(batch_size=None, batch_format="numpy")
        for img, y in zip(b["image"], b["label"])
    ]
    want = [(int(r[2]), img.tobytes()) for r, img in zip(reads[0], decode_uint8([r[1] for r in reads[0]], 8))]
    assert sorted(got) == sorted(want)


def test_missing_s3_sources_are_one_line_errors_at_validate(sources, tmp_path, capsys):
    cases = [
        (f"s3://{BUCKET}/nothing-here/", f"s3://{BUCKET}/nothing-here/: not a transferlab dataset"),
        (f"s3://{BUCKET}/laion/{{00000..00005}}.tar", f"s3://{BUCKET}/laion/00003.tar: shard named by"),
        ("s3://no-such-bucket/imgs", "s3://no-such-bucket/imgs: "),
    ]
    for uri, message in cases:
        path = tmp_path / "study.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "study": "missing",
                    "sources": {"remote": {"uri": uri}},
                    "tasks": {"t": "builtin:digits"},
                    "transfer": {"shots": [1]},
                }
            )
        )
        capsys.readouterr()
        assert main(["validate", str(path)]) == 2, uri
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: sources.remote.uri: {message}"), err
        assert main(["data", "inspect", uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_tar_safety_checks_hold_on_s3(sources, tmp_path):
    """The remote tar path is the local reader on a stream: links are never followed, a cut-off
    shard loses its tail, both counted as bad samples."""
    from datasets_.readers import BadSamples, iter_samples

    good = (sources / "laion" / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/x")
    for name in ("evil.tar", "cut.tar"):
        pafs.copy_files(str(tmp_path / name), f"{BUCKET}/unsafe/{name}", destination_filesystem=fs)
    bad = BadSamples()
    keys = [s.key for s in iter_samples(f"s3://{BUCKET}/unsafe/", bad)]
    assert 0 < len(keys) < 100 and all(k.startswith("00000") for k in keys)
    assert set(bad.counts) == {"unsafe tar member", "truncated or corrupt tar"}
    assert any("symlink to /etc/passwd" in e for e in bad.examples)
