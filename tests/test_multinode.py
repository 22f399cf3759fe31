"""Studies submitted to a two-node Ray cluster whose nodes share no disk (tests/multinode.py):
the head (no CPUs) plans and drives, every trial runs on the worker, which sees none of the head's
folders. Builtin data, a raw image folder on a shared mount and a datamodel sweep each run to
SUCCEEDED with every run FINISHED exactly once; a worker killed mid-study and started again, and
the study submitted again, leave the same runs, none twice, none RUNNING."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from multinode import Cluster, unavailable
from PIL import Image

from orchestrator.records.schema import (
    FINISHED,
    KIND_DATAMODELS,
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    TAG_CONFIG_HASH,
    TAG_KIND,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.timeout(1500), pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "")]

# pack: off, so runs are TorchTrainers whose workers land on the nodes under test
TINY = {"model": "tiny-cnn", "image_size": 8, "epochs": 1, "batch_size": 32, "pack": "off"}


# Slow: a real 2-node Ray cluster across network and mount namespaces, started once per module.
@pytest.fixture(scope="module")
def cluster():
    # A short root: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="tlmn-", dir="/tmp"))
    # 10.231.N.0/24 with a random N: two suites at once on one machine do not collide.
    net = f"10.231.{np.random.default_rng().integers(2, 250)}"
    c = Cluster(root, f"{net}.1", f"{net}.2", root / "shared")
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(cluster: Cluster, study: Path, storage: str, *extra: str, wait: str = "--follow", timeout: float = 600):
    """``transferlab submit`` from the test's own folder (the driver's working folder, hidden from
    the worker) to the head's veth address: never loopback, so nothing may assume shared files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_TRACKING"))}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), **cluster.env)
    cmd = [str(BIN / "transferlab"), "submit", str(study), *extra, "--address", cluster.api]
    cmd += ["--tracking-uri", cluster.mlflow_url, "--storage-path", storage, "--working-dir", str(REPO), wait]
    return subprocess.run(cmd, cwd=cluster.root / "driver", env=env, capture_output=True, text=True, timeout=timeout)


def _job_id(out: subprocess.CompletedProcess) -> str:
    return next(
        line.split()[1] for line in out.stdout.splitlines() if line.startswith(("submitted: ", "already running: "))
    )


def _runs(cluster: Cluster, study: str) -> dict[str, list]:
    client = MlflowClient(cluster.mlflow_url)
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no experiment {study}"
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=5000):
        out.setdefault(r.data.tags.get(TAG_KIND), []).append(r)
    return out


def _finished_once(runs: dict[str, list], kind: str) -> list:
    """Every run of ``kind`` FINISHED, one per config hash."""
    of_kind = runs.get(kind, [])
    hashes = [r.data.tags[TAG_CONFIG_HASH] for r in of_kind]
    assert len(hashes) == len(set(hashes)), f"{kind}: a config hash recorded twice"
    assert [r.info.status for r in of_kind] == [FINISHED] * len(of_kind), f"{kind}: not all FINISHED"
    return of_kind


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _assert_succeeded(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    assert ": SUCCEEDED" in out.stdout


# Slow: a job submitted to the 2-node cluster: the worker node reads published data and writes S3 checkpoints.
def test_builtin_study_on_s3_storage(cluster):
    study = _write(cluster.root / "driver" / "quick.yaml", {
        "study": "mn-builtin",
        "sources": {"digits": {"uri": "builtin:digits"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {**TINY, "sweep": {"pretrain_size": [200, 400], "label_noise": [0.0]}},
        "transfer": {"protocol": ["linear_probe"], "shots": [1, "full"], "seeds": [0]},
    })  # fmt: skip
    out = _submit(cluster, study, f"s3://{cluster.bucket}/studies")
    _assert_succeeded(out)
    runs = _runs(cluster, "mn-builtin")
    assert len(_finished_once(runs, KIND_PRETRAIN)) == 2 and len(_finished_once(runs, KIND_TRANSFER)) == 4
    assert [r.info.status for r in runs[KIND_STUDY]] == [FINISHED]
    # The job's log (streamed by --follow) holds the trials' own output, with the worker's address.
    assert f"ip={cluster.worker_ip}" in out.stdout


def _image_folder(root: Path) -> Path:
    """A raw ImageNet-style folder on the shared mount: 3 classes of 12x12 PNGs."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(40):
            img = np.clip(rng.normal(60 + 70 * c, 30, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


# Slow: a job on the 2-node cluster: the driver's scan index must reach the worker via shared storage.
def test_raw_folder_study_with_storage_on_a_shared_folder(cluster):
    folder = _image_folder(cluster.shared / "imgs")
    study = _write(cluster.root / "driver" / "folder.yaml", {
        "study": "mn-folder",
        "sources": {"imgs": {"uri": str(folder)}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {**TINY, "sweep": {"pretrain_size": [60]}},
        "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
    })  # fmt: skip
    out = _submit(cluster, study, str(cluster.shared / "storage"))
    _assert_succeeded(out)
    runs = _runs(cluster, "mn-folder")
    assert len(_finished_once(runs, KIND_PRETRAIN)) == 1 and len(_finished_once(runs, KIND_TRANSFER)) == 1
    # The scan index the driver made in its own cache went to the shared storage for the worker.
    assert list((cluster.shared / "storage" / "datasets").glob("imgs-*/manifest.json"))


# Slow: a datamodel sweep submitted to the 2-node cluster.
def test_datamodel_sweep(cluster):
    study = _write(cluster.root / "driver" / "dm.yaml", {
        "study": "mn-datamodels",
        "sources": {"digits": {"uri": "builtin:digits"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": TINY,
        "datamodels": {"source": "digits", "task": "digits", "num_models": 4, "models_per_trial": 2},
    })  # fmt: skip
    out = _submit(cluster, study, f"s3://{cluster.bucket}/studies")
    _assert_succeeded(out)
    runs = _runs(cluster, "mn-datamodels")
    (sweep,) = _finished_once(runs, KIND_DATAMODELS)
    assert sweep.data.metrics["models_done"] == 4


# Slow: the worker node is killed mid-study and the study resubmitted: three 3-epoch jobs so the kill lands mid-way.
def test_a_worker_killed_mid_study_then_the_study_submitted_again(cluster):
    study = _write(cluster.root / "driver" / "kill.yaml", {
        "study": "mn-kill",
        "sources": {"digits": {"uri": "builtin:digits"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {**TINY, "epochs": 3, "sweep": {"pretrain_size": [300, 600, 900]}},
        "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
        "resources": {"max_concurrent_trials": 1},
    })  # fmt: skip
    first = _submit(cluster, study, f"s3://{cluster.bucket}/studies", wait="--no-wait")
    assert first.returncode == 0, first.stderr
    job = _job_id(first)
    client = MlflowClient(cluster.mlflow_url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once the first pretraining run is done, the second under way
        exp = client.get_experiment_by_name("mn-kill")
        pre = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'") if exp else []
        if sum(r.info.status == FINISHED for r in pre) >= 1 and len(pre) == 3:
            break
        time.sleep(1)
    else:
        pytest.fail("the first pretraining run did not finish within 300 s")
    before = {r.data.tags[TAG_CONFIG_HASH]: r.info.run_id for r in pre}
    cluster.kill_worker()
    cluster.start_worker()
    # The first job ends, resumed by Ray Train on the new node or failed; either way it ends.
    status = [str(BIN / "transferlab"), "status", job, "--address", cluster.api]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    deadline, state = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        state = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60).stdout
        if any(f": {s}" in state for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    else:
        subprocess.run([str(BIN / "transferlab"), "stop", job, "--address", cluster.api], env=env, timeout=120)
    print(f"first job after the kill: {state.splitlines()[:1]}")  # shown with -s
    again = _submit(cluster, study, f"s3://{cluster.bucket}/studies")
    _assert_succeeded(again)
    # What finished before the kill is not trained again (the first job may have finished the
    # rest on the new node, Ray Train resuming the killed run, or failed it).
    done = re.search(r"3 pretraining runs \((\d+) already done\)", again.stdout)
    assert done and int(done.group(1)) >= 1, f"first job: {state.splitlines()[:1]}\n{again.stdout[-3000:]}"
    runs = _runs(cluster, "mn-kill")
    pretrain = _finished_once(runs, KIND_PRETRAIN)
    assert len(pretrain) == 3 and len(_finished_once(runs, KIND_TRANSFER)) == 3
    after = {r.data.tags[TAG_CONFIG_HASH]: r.info.run_id for r in pretrain}
    assert after == before  # the runs created before the kill were resumed, not made again
