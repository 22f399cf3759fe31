"""Builtin real datasets become Parquet shards with a manifest; images decode back exactly."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets_ import DatasetError, open_dataset, prepare_builtin, resolve_dataset
from datasets_.pipeline import decode_images, iter_local_batches


def test_digits_shards_and_manifest(tmp_path):
    ds = prepare_builtin("digits", root=tmp_path)
    m = json.loads((ds.root / "manifest.json").read_text())
    assert m["num_samples"] == 1797 and m["num_classes"] == 10
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["splits"]["train"]["num_samples"] + m["splits"]["test"]["num_samples"] == 1797
    assert 0.15 < m["splits"]["test"]["num_samples"] / 1797 < 0.25
    assert sum(m["splits"]["train"]["class_counts"]) == m["splits"]["train"]["num_samples"]
    table = pq.read_table(ds.files("train")[0])
    assert table.column_names == ["key", "image", "label", "caption"]
    assert table.column("caption")[0].as_py().startswith("a photo of the handwritten digit")
    train, test = ds.keys_and_labels("train"), ds.keys_and_labels("test")
    assert not set(train.keys) & set(test.keys)


def test_fingerprint_is_stable_across_preparations(tmp_path):
    a = prepare_builtin("digits", root=tmp_path / "a")
    b = prepare_builtin("digits", root=tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    assert open_dataset(a.root).fingerprint == a.fingerprint


def test_a_conversion_finished_first_elsewhere_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two processes converting one builtin at once (two drivers on a fresh machine, two test
    workers): the one that finishes second keeps the first one's folder, whose files a reader may
    already hold open, and leaves no temporary folder behind."""
    from datasets_ import builtin

    load, template = builtin.BUILTINS["digits"]
    first = {}

    def load_while_another_finishes():
        builtin.BUILTINS["digits"] = (load, template)
        first["ds"] = prepare_builtin("digits", root=tmp_path)  # the other process, done meanwhile
        first["shards"] = {p: p.stat().st_ino for p in first["ds"].root.rglob("*") if p.is_file()}
        return load()

    monkeypatch.setitem(builtin.BUILTINS, "digits", (load_while_another_finishes, template))
    second = prepare_builtin("digits", root=tmp_path)
    assert second.root == first["ds"].root and second.fingerprint == first["ds"].fingerprint
    assert {p: p.stat().st_ino for p in second.root.rglob("*") if p.is_file()} == first["shards"]
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [second.root.name]


def test_png_round_trip_matches_the_package_pixels(tmp_path):
    from sklearn.datasets import load_digits

    ds = prepare_builtin("digits", root=tmp_path)
    batch = next(iter_local_batches(ds, "train", image_size=8, batch_size=16))
    index = int(batch["key"][0].split("-")[1])
    expected = np.round(load_digits().images[index] * 255 / 16)
    got = (batch["image"][0] * 0.5 + 0.5) * 255
    assert got.shape == (3, 8, 8)
    np.testing.assert_allclose(got[0], expected, atol=1e-3)
    assert batch["label"][0] == load_digits().target[index]


def test_decode_resizes_to_three_channels(tmp_path):
    ds = prepare_builtin("digits", root=tmp_path)
    blob = pq.read_table(ds.files("test")[0], columns=["image"]).column("image")[0].as_py()
    out = decode_images([blob], image_size=32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0


def test_missing_and_foreign_directories_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such directory"):
        resolve_dataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="no manifest.json"):
        resolve_dataset(str(tmp_path))
    with pytest.raises(DatasetError, match="unknown builtin dataset 'cifar'"):
        resolve_dataset("builtin:cifar")


def test_shard_units_cut_a_split_into_row_ranges_that_read_back_in_order(tmp_path):
    from datasets_.indexed import iter_encoded, iter_unit, shard_units

    ds = prepare_builtin("digits", root=tmp_path)
    columns = ["key", "image", "label"]
    units = shard_units(ds, "train", columns, rows_per_unit=100)
    n = ds.num_samples("train")
    assert len(units) == -(-n // 100) and units[0]["rows"] == [0, 100] and units[-1]["rows"][1] == n
    # batch_size 64 does not divide 100: unit edges fall inside Parquet batches
    cut = [
        (k, img, int(y)) for u in units for b in iter_unit(u, 64) for k, img, y in zip(b["key"], b["image"], b["label"])
    ]
    whole = [
        (k, img, int(y)) for b in iter_encoded(ds, "train", 256) for k, img, y in zip(b["key"], b["image"], b["label"])
    ]
    assert cut == whole and len(cut) == n


def test_ray_dataset_streams_every_sample_once_decoded(ray_cluster, tmp_path):
    from datasets_.pipeline import decode_split, ray_dataset

    ds = prepare_builtin("digits", root=tmp_path)
    data = ray_dataset(ds, "train", image_size=8, decode_batch_size=100, concurrency=2)
    got = sorted(
        (int(y), img.tobytes())
        for b in data.iter_batches(batch_size=None, batch_format="numpy")
        for img, y in zip(b["image"], b["label"])
    )
    images, labels, _ = decode_split(ds, "train", image_size=8)
    assert got == sorted((int(y), img.tobytes()) for img, y in zip(images.numpy(), labels))


KEEP_MEMORY_PROBE = """
import ctypes, sys
import numpy as np
from datasets_.pipeline import keep_batch_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_batch_memory()
batch = np.ones((64, 3, 224, 224), dtype=np.float32)  # 38.5 MB: above glibc's 32 MiB automatic mmap threshold
print(kept, libc.mallinfo2().hblkhd >= batch.nbytes)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_batch_memory_puts_batch_sized_buffers_in_the_reusable_heap():
    def probe(env):
        out = subprocess.run(
            [sys.executable, "-c", KEEP_MEMORY_PROBE],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        )
        return out.stdout.split()

    assert probe({"TRANSFERLAB_KEEP_BATCH_MEMORY": "1"}) == ["True", "False"]  # in the heap, reused
    assert probe({"TRANSFERLAB_KEEP_BATCH_MEMORY": "0"}) == ["False", "True"]  # glibc's default: its own mapping
