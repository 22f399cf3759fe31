"""What a study publishes to its storage before any trial starts: the datasets the driver built
in its own cache (builtins, raw-source scans), so that no trial opens a path of the driver's
disk; and what a trial says when its data is not where the plan put it."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from datasets_ import DatasetError, open_dataset, prepare_builtin, resolve_dataset
from datasets_.prepare import publish, upload
from orchestrator.execution.phase import TrialContext


def _context(**datasets) -> TrialContext:
    return TrialContext(
        study="s", tracking_uri="sqlite:///x.db", experiment_id="0", storage_path="/x", datasets=datasets
    )


def test_a_builtin_is_copied_to_storage_once_and_opens_there(tmp_path):
    ds = prepare_builtin("digits")
    uri = publish(ds, str(tmp_path / "storage"))
    assert uri == f"{tmp_path}/storage/datasets/{ds.name}-{ds.fingerprint}"
    copy = open_dataset(uri)
    assert copy.fingerprint == ds.fingerprint and copy.num_samples("train") == ds.num_samples("train")
    assert np.array_equal(copy.keys_and_labels("test").keys, ds.keys_and_labels("test").keys)
    written = os.stat(f"{uri}/manifest.json").st_mtime_ns
    assert publish(ds, str(tmp_path / "storage")) == uri  # already there: not copied again
    assert os.stat(f"{uri}/manifest.json").st_mtime_ns == written


def test_a_dataset_of_the_users_own_is_not_copied(tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(prepare_builtin("digits").root, mine)
    assert publish(open_dataset(mine), str(tmp_path / "storage")) == str(mine)
    assert not (tmp_path / "storage").exists()


def test_a_raw_scan_publishes_its_index_and_still_reads_the_sources_own_files(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    scan = resolve_dataset(str(tmp_path / "imgs"))
    assert scan.format == "raw"
    uri = publish(scan, str(tmp_path / "storage"))
    copied = sorted(p.relative_to(uri).as_posix() for p in (tmp_path / "storage").rglob("*") if p.is_file())
    assert copied == ["index/test.parquet", "index/train.parquet", "manifest.json"]  # no image copied
    opened = open_dataset(uri)
    assert opened.fingerprint == scan.fingerprint and opened.files("train") == scan.files("train")
    (tmp_path / "imgs" / "cat" / "0.png").unlink()  # as on a node that does not see the source
    with pytest.raises(DatasetError, match=r"0\.png: no such file here, though the scan of .*imgs read it"):
        open_dataset(uri)


def test_a_trial_names_the_uri_and_its_node_when_its_data_is_missing_or_changed(tmp_path):
    ds = prepare_builtin("digits")
    uri = publish(ds, str(tmp_path / "storage"))
    assert _context(**{"tasks.d": (uri, ds.fingerprint)}).open_data("tasks.d").fingerprint == ds.fingerprint
    with pytest.raises(DatasetError, match=rf"^{tmp_path}/gone: no such directory \(on node .+\)$"):
        _context(**{"tasks.d": (str(tmp_path / "gone"), ds.fingerprint)}).open_data("tasks.d")
    with pytest.raises(DatasetError, match=r"fingerprint .* on node .*, but the plan's is 0123: the dataset changed"):
        _context(**{"tasks.d": (uri, "0123")}).open_data("tasks.d")


def test_upload_to_an_object_store_is_manifest_last(tmp_path, s3_server):
    import boto3
    import pyarrow.fs as pafs

    boto3.client("s3").create_bucket(Bucket="published")
    ds = prepare_builtin("digits")
    upload(ds, "s3://published/digits")
    fs, _ = pafs.FileSystem.from_uri("s3://published/digits")
    with fs.open_input_stream("published/digits/manifest.json") as f:
        assert json.loads(f.read())["fingerprint"] == ds.fingerprint
    assert open_dataset("s3://published/digits").num_samples("train") == ds.num_samples("train")
