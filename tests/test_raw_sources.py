"""Shard formats and raw sources: `data prepare --format webdataset` writes img2dataset tars that
read back as the same samples; a study reads folders / tars / Parquet as they are (a cached
scan, images streamed by Ray Data from the source's own files); caption noise for CLIP."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from datasets_ import open_dataset, resolve_dataset
from datasets_.indexed import iter_encoded, read_units
from datasets_.prepare import inspect, prepare
from datasets_.readers import BadSamples, iter_samples
from orchestrator.cli import main


def _digits(n):
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(np.round(d.images[i] * 255 / 16).astype(np.uint8), int(d.target[i])) for i in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _folder(root, n=60, classes=3):
    """An ImageNet-style folder; some file names have dots (not valid WebDataset member keys)."""
    for i, (img, label) in enumerate(_digits(n)):
        d = root / f"class_{label % classes}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"img.{i:03d}.png" if i % 5 == 0 else f"{i:03d}.jpg"
        (d / name).write_bytes(_png(img) if name.endswith("png") else _jpeg(img))
    return root


def _tars(root, n=80, per_shard=40, classes=4):
    """img2dataset-style tars with a distinct caption per sample."""
    root.mkdir(parents=True)
    images = _digits(n)
    for shard in range(n // per_shard):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(per_shard):
                img, digit = images[shard * per_shard + j]
                key, label = f"{shard:05d}{j:04d}", digit % classes
                for ext, data in (
                    ("png", _png(img)),
                    ("txt", f"digit {digit} number {key}".encode()),
                    ("cls", str(label).encode()),
                    ("json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{{00000..{n // per_shard - 1:05d}}}.tar")


def _samples(ds):
    out = {}
    for split in ds.manifest["splits"]:
        for b in iter_encoded(ds, split, columns=("key", "image", "label", "caption")):
            for k, img, y, c in zip(b["key"], b["image"], b["label"], b["caption"]):
                out[k] = (split, img, int(y), c)
    return out


def test_webdataset_output_reads_back_as_the_same_samples(tmp_path, capsys):
    src = _folder(tmp_path / "folder")
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "pq"), "--shard-size", "16"]) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                str(src),
                "--out",
                str(tmp_path / "wds"),
                "--shard-size",
                "16",
                "--format",
                "webdataset",
            ]
        )
        == 0
    )
    pq_ds, wds = open_dataset(tmp_path / "pq"), open_dataset(tmp_path / "wds")
    assert wds.format == "webdataset" and wds.files("train")[0].endswith("train/part-00000.tar")
    # Same manifest facts; the content fingerprint is equal, the byte fingerprint is per format.
    for field in ("num_samples", "classes", "splits", "content_fingerprint"):
        assert wds.manifest[field] == pq_ds.manifest[field], field
    assert wds.fingerprint != pq_ds.fingerprint
    assert inspect(str(src))["fingerprint"] == pq_ds.manifest["content_fingerprint"]
    assert _samples(wds) == _samples(pq_ds)
    assert [u["paths"] for u in read_units(wds, "train")] == [[f] for f in wds.files("train")]  # one read task per tar
    for split in ("train", "test"):
        a, b = wds.keys_and_labels(split), pq_ds.keys_and_labels(split)
        assert list(a.keys) == list(b.keys) and list(a.labels) == list(b.labels)
    # img2dataset layout: KEY.png|jpg, KEY.txt, KEY.cls, KEY.json; dotted keys live in the json.
    with tarfile.open(wds.files("train")[0]) as tar:
        names = tar.getnames()
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "jpg", "txt", "cls", "json"}
    # Our own reader takes the tars as a raw source, with the original keys and class names.
    bad = BadSamples()
    raw = {s.key: (s.image, s.label, s.class_name) for s in iter_samples(str(tmp_path / "wds" / "train"), bad)}
    assert bad.total == 0 and raw == {
        k: (v[1], v[2], wds.classes[v[2]]) for k, v in _samples(wds).items() if v[0] == "train"
    }
    assert any("." in k for k in raw)
    # Preparing again gives byte-identical tars (fixed tar metadata).
    again, _ = prepare(str(src), str(tmp_path / "wds2"), shard_size=16, shard_format="webdataset")
    assert again.fingerprint == wds.fingerprint


def test_raw_sources_are_scanned_once_and_rescanned_when_they_change(tmp_path):
    src = _folder(tmp_path / "folder", n=30)
    first = resolve_dataset(str(src))
    assert first.format == "raw" and first.manifest["source_format"] == "folder"
    assert first.root == resolve_dataset(str(src)).root  # the cached scan is reused
    # The scan holds no image bytes: only its manifest and the per-split index.
    assert sorted(p.name for p in first.root.rglob("*") if p.is_file()) == [
        "manifest.json",
        "test.parquet",
        "train.parquet",
    ]
    prepared, _ = prepare(str(src), str(tmp_path / "pq"))
    assert _samples(first) == _samples(prepared)
    assert first.fingerprint == prepared.manifest["content_fingerprint"]
    sorted((src / "class_0").iterdir())[0].unlink()
    second = resolve_dataset(str(src))
    assert second.root != first.root and second.num_samples("train") + second.num_samples("test") == 29
    # Parquet with configured columns, read where it lies.
    rows = _digits(20)
    pq.write_table(
        pa.table(
            {"uid": [f"u{i}" for i in range(20)], "jpg": [_png(x) for x, _ in rows], "label": [y % 2 for _, y in rows]}
        ),
        tmp_path / "p.parquet",
    )
    ds = resolve_dataset(str(tmp_path / "p.parquet"), key_column="uid")
    assert ds.manifest["source_format"] == "parquet" and set(_samples(ds)) == {f"u{i}" for i in range(20)}
    # The same, named in a study: the spec's column names reach the scan.
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "study": "p",
                "sources": {"p": {"uri": "p.parquet", "key_column": "uid"}},
                "tasks": {"f": str(src)},
                "transfer": {"shots": [1]},
            }
        )
    )
    assert main(["validate", str(spec)]) == 0
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import load_spec

    plan = build_plan(load_spec(spec))
    assert plan.data["sources.p"].root == ds.root and plan.pretrain_runs[0].source == "p"


def _study(tmp_path, source_uri, task_uri, **pretrain):
    body = {
        "study": "raw",
        "sources": {"tars": {"uri": source_uri}},
        "tasks": {"folder": {"uri": task_uri}},
        "pretrain": {"model": "tiny-cnn", "image_size": 8, "epochs": 1, "batch_size": 16, **pretrain},
        "transfer": {"shots": [1], "seeds": [0], "val_fraction": 0.2},
        "resources": {"workers": 1, "max_failures": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_caption_noise_is_refused_where_it_cannot_apply(tmp_path, capsys):
    tars, folder = _tars(tmp_path / "wds"), str(_folder(tmp_path / "folder"))
    capsys.readouterr()
    assert main(["validate", str(_study(tmp_path, tars, folder, sweep={"caption_noise": [0.3]}))]) == 2
    assert capsys.readouterr().err.startswith("error: pretrain.sweep.caption_noise: caption noise swaps the captions")
    assert main(["validate", str(_study(tmp_path, folder, folder, method="clip", sweep={"caption_noise": [0.3]}))]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: sources.tars.uri: source 'tars' has no captions for caption_noise to swap"
    )
    assert main(["validate", str(_study(tmp_path, tars, folder, method="clip", sweep={"caption_noise": [1.5]}))]) == 2
    assert "pretrain.sweep.caption_noise[0]: must be in [0, 1], got 1.5" in capsys.readouterr().err


# Slow (~55 s): a real CLIP pretraining on raw tars with no prepare step (scan, tar reader in Ray Data, caption noise);
# swapped captions keep a CLIP run out of packing, so it is a TorchTrainer.
@pytest.mark.timeout(600)
def test_clip_study_on_raw_tars_with_caption_noise(ray_cluster, tmp_path):
    """No prepare step: the source is a tar pattern, the task an image folder, both as they are."""
    tars, folder = _tars(tmp_path / "wds"), str(_folder(tmp_path / "folder"))
    study = _study(tmp_path, tars, folder, method="clip", sweep={"caption_noise": [0.5]})
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(study), "--tracking-uri", db, "--storage-path", str(tmp_path / "storage")]) == 0
    client = MlflowClient(db)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("raw").experiment_id])}
    pre = runs["clip tars n=full noise=0 captions=0.5"]
    assert pre.info.status == "FINISHED" and pre.data.params["caption_noise"] == "0.5"
    n = int(pre.data.metrics["num_train_samples"])
    assert n == resolve_dataset(tars).num_samples("train") and n > 50
    # Swapped captions are decided per key: about half, never all or none of ~60.
    assert 0.3 <= pre.data.metrics["realized_caption_noise"] <= 0.7
    assert 0.0 <= pre.data.metrics["upstream_accuracy"] <= 1.0
    assert runs["linear_probe folder 1-shot seed=0"].info.status == "FINISHED"


def test_prepare_shows_live_progress_with_files_done_of_total(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "src", n=600)
    monkeypatch.setenv("TRANSFERLAB_PROGRESS_S", "0")  # a line at every check instead of every 5 s
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "ds")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f"prepare {src}")]
    assert len(lines) == 3  # after 256 and 512 samples, then the final count
    assert "256 samples read so far, 256/600 files" in lines[0] and "samples/s" in lines[0]
    assert "600 samples read done, 600/600 files" in lines[-1]
