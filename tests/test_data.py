"""Builtin real datasets become Parquet shards with a manifest; images decode back exactly."""

import json

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
