"""Readers take folders, img2dataset tars and Parquet as they are; bad samples are skipped and
counted (or stop the run when asked); prepare/inspect work from the command line."""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_ import DatasetError, open_dataset
from datasets_.listing import expand_braces
from datasets_.prepare import inspect, prepare
from datasets_.readers import BadSamples, iter_samples
from orchestrator.cli import main


def _digit_images(n=30):
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(np.round(d.images[i] * 255 / 16).astype(np.uint8), int(d.target[i])) for i in range(n)]


def _encode(img, fmt):
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB" if fmt == "JPEG" else "L").save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(_digit_images(40)):
        split = "val" if i % 4 == 0 else "train"
        d = root / split / f"digit_{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.{'png' if i % 2 else 'jpg'}").write_bytes(_encode(img, "PNG" if i % 2 else "JPEG"))
    (root / "train" / "digit_1" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "train" / "digit_1" / "notes.txt").write_text("ignored")
    os.symlink("/etc/passwd", root / "train" / "digit_1" / "link.png")
    return root


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def tars(tmp_path):
    """Two img2dataset-layout shards plus hostile members."""
    root = tmp_path / "wds"
    root.mkdir()
    images = _digit_images(20)
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(10):
                img, label = images[shard * 10 + j]
                key = f"{shard:05d}{j:04d}"
                _tar_add(tar, f"{key}.jpg", _encode(img, "JPEG"))
                _tar_add(tar, f"{key}.txt", f"a photo of the digit {label}".encode())
                _tar_add(tar, f"{key}.json", json.dumps({"key": key, "class_name": f"digit {label}"}).encode())
                _tar_add(tar, f"{key}.cls", str(label).encode())
            if shard == 0:
                link = tarfile.TarInfo("evil.jpg")
                link.type = tarfile.SYMTYPE
                link.linkname = "/etc/passwd"
                tar.addfile(link)
                _tar_add(tar, "../../escape.jpg", _encode(images[0][0], "JPEG"))
                _tar_add(tar, "garbage.jpg", b"\x00" * 64)
                _tar_add(tar, "garbage.cls", b"3")
    return root


def test_folder_reader(folder):
    bad = BadSamples()
    samples = list(iter_samples(str(folder), bad))
    assert len(samples) == 40
    assert {s.split for s in samples} == {"train", "test"}
    assert bad.counts == {"undecodable image": 1}
    assert all(Image.open(io.BytesIO(s.image)).size == (8, 8) for s in samples)
    names = sorted({s.class_name for s in samples})
    assert all(names[s.label] == s.class_name for s in samples)


def test_webdataset_reader_ignores_links_and_counts_bad_images(tars):
    bad = BadSamples()
    samples = list(iter_samples(str(tars / "{00000..00001}.tar"), bad))
    keys = [s.key for s in samples]
    assert len(samples) == 20  # the symlink and the '../../escape' member are refused (tests/test_untrusted_shards.py)
    assert "evil" not in keys
    assert bad.counts == {"undecodable image": 1, "unsafe tar member": 2}
    s = samples[0]
    assert s.caption.startswith("a photo of the digit") and s.class_name.startswith("digit ")
    assert s.label == int(s.caption.split()[-1])


def test_truncated_tar_keeps_what_was_readable(tars, tmp_path):
    data = (tars / "00001.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    bad = BadSamples()
    samples = list(iter_samples(str(cut), bad))
    assert 0 < len(samples) < 10
    assert "truncated or corrupt tar" in bad.counts
    with pytest.raises(DatasetError, match="cut.tar"):
        list(iter_samples(str(cut), BadSamples("error")))


def test_parquet_reader_with_configured_columns(tmp_path):
    images = _digit_images(12)
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(12)],
            "png_bytes": [_encode(img, "PNG") for img, _ in images],
            "target": [lbl for _, lbl in images],
            "text": [f"digit {lbl}" for _, lbl in images],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    samples = list(
        iter_samples(
            str(tmp_path / "part-0.parquet"),
            BadSamples(),
            image_column="png_bytes",
            label_column="target",
            caption_column="text",
            key_column="uid",
        )
    )
    assert [s.key for s in samples] == [f"u{i}" for i in range(12)]
    assert [s.label for s in samples] == [lbl for _, lbl in images]
    with pytest.raises(DatasetError, match="no image column 'jpg'"):
        list(iter_samples(str(tmp_path / "part-0.parquet"), BadSamples(), image_column="jpg"))


def test_decompression_bomb_is_a_bad_sample(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    d = tmp_path / "bomb" / "cls"
    d.mkdir(parents=True)
    (d / "bomb.png").write_bytes(buf.getvalue())
    (d / "ok.png").write_bytes(_encode(_digit_images(1)[0][0], "PNG"))
    bad = BadSamples()
    assert [s.key for s in iter_samples(str(tmp_path / "bomb"), bad)] == ["cls/ok"]
    assert list(bad.counts) == ["image too large"]


def test_brace_expansion():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_prepare_folder_then_inspect(folder, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(folder), "--out", str(out), "--shard-size", "7"]) == 0
    captured = capsys.readouterr()
    assert "40 samples" in captured.out and "skipped 1 bad sample(s): undecodable image x1" in captured.err
    ds = open_dataset(out)
    assert ds.num_samples("train") == 30 and ds.num_samples("test") == 10
    assert ds.classes == sorted({p.name for p in (folder / "train").iterdir()})
    assert len(ds.files("train")) == 5  # 30 samples in shards of 7
    assert main(["data", "inspect", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {k: m[k] for k in ("num_samples", "num_classes", "fingerprint")} == {
        "num_samples": 40,
        "num_classes": ds.num_classes,
        "fingerprint": ds.fingerprint,
    }
    assert m["bad_samples"]["total"] == 1
    # Preparing the same source again gives the same fingerprint.
    again, _ = prepare(str(folder), str(tmp_path / "again"), shard_size=7)
    assert again.fingerprint == ds.fingerprint


def test_prepare_tars_and_use_them_in_a_study_spec(tars, tmp_path, capsys):
    out = tmp_path / "wds-prepared"
    assert main(["data", "prepare", str(tars / "{00000..00001}.tar"), "--out", str(out)]) == 0
    # The symlink and the '../../escape' member are refused as unsafe: skipped and counted.
    assert "skipped 3 bad sample(s): unsafe tar member x2, undecodable image x1" in capsys.readouterr().err
    ds = open_dataset(out)
    assert ds.num_samples("train") + ds.num_samples("test") == 20
    assert ds.classes[0] == "digit 0"
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()
    raw = inspect(str(tars))
    assert raw["num_samples"] == 20 and raw["unlabeled"] == 0 and raw["prepared"] is False
    assert raw["bad_samples"]["total"] == 3
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"study: wds\nsources: {{w: {{uri: {out}}}}}\ntasks: {{d: {{uri: 'builtin:digits'}}}}\ntransfer: "
        f"{{shots: [1]}}\n"
    )
    capsys.readouterr()
    assert main(["validate", str(spec)]) == 0
    assert "1 pretraining runs" in capsys.readouterr().out


def test_on_bad_sample_error_names_shard_and_key(folder, tmp_path, capsys):
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "x"), "--on-bad-sample", "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "digit_1: sample 'broken.jpg': undecodable image" in err
    assert not (tmp_path / "x").exists()


def test_inspect_missing_path_is_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such file or directory"


def test_unlabeled_source_cannot_be_pretrained_supervised(tmp_path, capsys):
    table = pa.table({"jpg": [_encode(img, "JPEG") for img, _ in _digit_images(10)], "caption": ["a digit"] * 10})
    pq.write_table(table, tmp_path / "captions.parquet")
    assert main(["data", "prepare", str(tmp_path / "captions.parquet"), "--out", str(tmp_path / "c")]) == 0
    assert open_dataset(tmp_path / "c").num_classes == 0
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"study: c\nsources: {{c: {{uri: {tmp_path / 'c'}}}}}\ntasks: {{d: 'builtin:digits'}}\ntransfer: "
        f"{{shots: [1]}}\n"
    )
    capsys.readouterr()
    assert main(["validate", str(spec)]) == 2
    assert capsys.readouterr().err.startswith("error: sources.c.uri: 'c' needs integer labels")


def test_overlap_finds_planted_duplicates_and_nothing_else(tmp_path, capsys):
    """Digits copied into another dataset (as-is, re-encoded as JPEG, upscaled) are found."""
    from datasets_ import prepare_builtin

    digits = prepare_builtin("digits")
    test_rows = pq.read_table(digits.files("test")[0], columns=["key", "image"]).to_pylist()[:6]
    root = tmp_path / "leaky" / "train" / "digits"
    root.mkdir(parents=True)
    for i, row in enumerate(test_rows[:2]):
        (root / f"exact{i}.png").write_bytes(row["image"])
    for i, row in enumerate(test_rows[2:4]):
        img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((32, 32), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        (root / f"near{i}.jpg").write_bytes(buf.getvalue())
    mnist = prepare_builtin("mnist")
    mnist_rows = pq.read_table(mnist.files("train")[0], columns=["image"]).column("image").to_pylist()[:20]
    for split, rows in (("train", mnist_rows[:14]), ("val", mnist_rows[14:])):
        (tmp_path / "leaky" / split / "mnist").mkdir(parents=True)
        for i, blob in enumerate(rows):
            (tmp_path / "leaky" / split / "mnist" / f"mnist{i}.png").write_bytes(blob)
    assert main(["data", "prepare", str(tmp_path / "leaky"), "--out", str(tmp_path / "leaky-ds")]) == 0
    capsys.readouterr()
    assert main(["data", "overlap", str(tmp_path / "leaky-ds"), "builtin:digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {(p["a_key"].split("/")[-1], p["b_key"], p["kind"]) for p in report["pairs"]}
    expected_exact = {(f"exact{i}", test_rows[i]["key"], "exact") for i in range(2)}
    expected_near = {(f"near{i}", test_rows[2 + i]["key"], "near") for i in range(2)}
    assert expected_exact | expected_near <= found
    assert not any(a.startswith("mnist") for a, _, _ in found)  # no false alarms on MNIST digits

    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"study: leak\nsources: {{l: {{uri: {tmp_path / 'leaky-ds'}}}}}\ntasks: {{d: 'builtin:digits'}}\n"
        "transfer: {shots: [1]}\npreflight_overlap: error\n"
    )
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight_overlap: source 'l' (train) and task 'd' (test) share 2 exact and 2 near")
