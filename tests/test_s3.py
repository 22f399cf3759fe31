"""Datasets on an S3-compatible object store (moto's real server on loopback), read by the CLI,
the planner and Ray Data inside a study. (Raw sources on S3 in detail: tests/test_s3_sources.py.)"""

import io
import json
import tarfile

import boto3
import pyarrow.fs as pafs
import pytest
import yaml
from mlflow.tracking import MlflowClient

from datasets_ import DatasetError, open_dataset, prepare_builtin
from orchestrator.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def s3_digits(s3_server):
    boto3.client("s3").create_bucket(Bucket="lab")
    local = prepare_builtin("digits")
    fs, _ = pafs.FileSystem.from_uri("s3://lab/x")
    pafs.copy_files(str(local.root), "lab/datasets/digits", destination_filesystem=fs)
    return "s3://lab/datasets/digits", local


def test_open_and_inspect_a_dataset_on_s3(s3_digits, capsys):
    uri, local = s3_digits
    ds = open_dataset(uri)
    assert ds.fingerprint == local.fingerprint and ds.num_samples("train") == local.num_samples("train")
    assert ds.files("train")[0].startswith("s3://lab/datasets/digits/train/")
    assert main(["data", "inspect", uri, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["num_samples"], m["num_classes"], m["fingerprint"]) == (1797, 10, local.fingerprint)


def test_missing_s3_dataset_is_a_clear_error(s3_digits, capsys):
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset("s3://lab/datasets/nothing-here")
    assert main(["data", "inspect", "s3://lab/datasets/nothing-here"]) == 2
    assert capsys.readouterr().err.startswith("error: s3://lab/datasets/nothing-here: not a transferlab dataset")


def _raw_tars_on_s3(tmp_path) -> str:
    """300 digits as img2dataset tars (KEY.jpg, KEY.cls), uploaded as they are."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    (tmp_path / "laion").mkdir()
    for shard in range(3):
        with tarfile.open(tmp_path / "laion" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 100, shard * 100 + 100):
                buf = io.BytesIO()
                Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(d.target[i]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    fs, _ = pafs.FileSystem.from_uri("s3://lab/x")
    pafs.copy_files(str(tmp_path / "laion"), "lab/raw/laion", destination_filesystem=fs)
    return "s3://lab/raw/laion/{00000..00002}.tar"


# Slow (~30 s): two S3 sources (Parquet and raw tars) through Ray Data in one real study.
def test_a_study_streams_its_source_from_s3(ray_cluster, s3_digits, tmp_path):
    """Two sources on S3 in one study: a prepared dataset (Ray's Parquet reader) and raw tars read
    as they are (a scan, then our tar reader inside Ray Data tasks)."""
    uri, _ = s3_digits
    study = {
        "study": "from-s3",
        "sources": {"remote": {"uri": uri}, "laion": {"uri": _raw_tars_on_s3(tmp_path)}},
        "tasks": {"local": {"uri": "builtin:digits"}},
        "pretrain": {"model": "tiny-cnn", "image_size": 16, "epochs": 1, "sweep": {"pretrain_size": [200]}},
        "transfer": {"shots": [1], "seeds": [0]},
        "resources": {"workers": 1, "max_failures": 0},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", db, "--storage-path", str(tmp_path / "storage")]) == 0
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("from-s3").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    for source in ("remote", "laion"):
        pre = runs[f"supervised {source} n=200 noise=0"]
        assert pre.info.status == "FINISHED" and pre.data.metrics["num_train_samples"] == 200
        assert 0.0 <= pre.data.metrics["upstream_accuracy"] <= 1.0
    assert runs["linear_probe local 1-shot seed=0"].info.status == "FINISHED"


def test_prepare_writes_a_dataset_straight_to_s3(s3_digits, tmp_path, capsys):
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(24):
        folder = tmp_path / "src" / f"digit_{d.target[i] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        (folder / f"{i:02d}.png").write_bytes(buf.getvalue())
    uri = "s3://lab/prepared/tiny"
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", uri, "--shard-size", "8"]) == 0
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "local"), "--shard-size", "8"]) == 0
    remote, local = open_dataset(uri), open_dataset(tmp_path / "local")
    assert remote.fingerprint == local.fingerprint and remote.num_samples("train") == local.num_samples("train")
    assert list(remote.keys_and_labels("train").keys) == list(local.keys_and_labels("train").keys)
    capsys.readouterr()
    assert (
        main(["data", "prepare", str(tmp_path / "src"), "--out", "s3://lab/prepared/w", "--format", "webdataset"]) == 0
    )
    assert open_dataset("s3://lab/prepared/w").format == "webdataset"
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", "s3://no-such-bucket/x"]) == 2
    assert capsys.readouterr().err.startswith("error: s3://no-such-bucket/x: cannot write dataset")
