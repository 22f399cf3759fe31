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
from orchestrator.records.spool import SPOOL_DIR

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.timeout(1500), pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "")]

# pack: off, so runs are TorchTrainers whose workers land on the nodes under test
TINY = {"model": "tiny-cnn", "image_size": 8, "epochs": 1, "batch_size": 32, "pack": "off"}


# Slow (~30 s, once per module): a real 2-node Ray cluster across network and mount namespaces, with its own MLflow and
# S3 servers: every test here needs nodes that share no disk.
@pytest.fixture(scope="module")
def cluster():
    # A short root: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="tlmn-", dir="/tmp"))
    # 10.231.N.0/24 with a random N: two suites at once on one machine do not collide.
    net = f"10.231.{np.random.default_rng().integers(2, 250)}"
    c = Cluster(root, f"{net}.1", f"{net}.2", root / "shared", disk_mb=128)
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


# Slow (~120 s): a job whose 2 pack-off TorchTrainers and 2 transfer trials run on the worker node of the 2-node
# cluster, reading published data and checkpointing to S3 (moto): the module's one study with S3 storage.
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


# Slow (~60 s): a job on the 2-node cluster (one pack-off TorchTrainer, one fit, on the worker): the driver's scan index
# must reach the worker via shared storage.
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


# Slow (~30 s): a datamodel sweep (4 models, 2 trials) submitted as a job to the 2-node cluster.
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


def _until(what: str, timeout: float, condition):
    """Wait for ``condition()`` to be true (an error while a server is down counts as false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.3)
    pytest.fail(f"waited {timeout:.0f}s for {what}")


def _pretraining(cluster: Cluster, study: str) -> list:
    client = MlflowClient(cluster.mlflow_url)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'") if exp else []


def _finished(cluster: Cluster, study: str) -> int:
    return sum(r.info.status == FINISHED for r in _pretraining(cluster, study))


def _job_end(cluster: Cluster, job: str, timeout: float = 600) -> str:
    """The job's last state line once it ended (stopped first if it has not within ``timeout``)."""
    status = [str(BIN / "transferlab"), "status", job, "--address", cluster.api]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = subprocess.run(status, env=env, capture_output=True, text=True, timeout=120).stdout
        except subprocess.TimeoutExpired:  # a loaded machine: ask again
            continue
        if any(f": {s}" in state for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            return state
        time.sleep(2)
    subprocess.run([str(BIN / "transferlab"), "stop", job, "--address", cluster.api], env=env, timeout=120)
    return "stopped by the test"


def _job_log(cluster: Cluster, job: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [str(BIN / "transferlab"), "logs", job, "--address", cluster.api]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120).stdout


# Slow (~255 s): three jobs of one study (each a driver and its Tune phases on the cluster) and three faults, each
# landing mid-run in its own of the three pack-off 3-epoch TorchTrainers: server kill, full disk, worker kill.
def test_chaos_a_study_through_a_server_kill_a_full_disk_and_a_worker_kill_resumes_exactly_once(cluster):
    name, storage = "mn-chaos", cluster.disk / "studies"
    study = _write(cluster.root / "driver" / "chaos.yaml", {
        "study": name,
        "sources": {"digits": {"uri": "builtin:digits"}},
        "tasks": {"digits": {"uri": "builtin:digits"}},
        "pretrain": {**TINY, "epochs": 3, "sweep": {"pretrain_size": [300, 600, 900]}},
        "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
        "resources": {"max_concurrent_trials": 1, "max_failures": 0},
    })  # fmt: skip
    faults: list[str] = []

    # 1. The tracking server is SIGKILLed once the first run trains, and started again (same
    # port and store) once a report of that run had to go to the storage spool: the job goes on.
    first = _submit(cluster, study, str(storage), wait="--no-wait")
    assert first.returncode == 0, first.stderr
    job = _job_id(first)
    _until("the first pretraining run to train", 300, lambda: any(storage.glob("pretrain-*")))
    cluster.kill_mlflow()
    killed_at = time.time()
    _until("a report spooled while the server was down", 120, lambda: any((storage / SPOOL_DIR).rglob("*.json")))
    time.sleep(2)
    cluster.start_mlflow()
    back_at = time.time()
    faults.append("tracking server killed")
    before = {r.data.tags[TAG_CONFIG_HASH]: r.info.run_id for r in _pretraining(cluster, name)}
    assert len(before) == 3

    # 2. The storage disk fills while the second run trains: its checkpoint cannot be written.
    _until(
        "the second run to train",
        300,
        lambda: _finished(cluster, name) >= 1 and len(list(storage.glob("pretrain-*"))) >= 2,
    )
    filled = cluster.fill_disk()
    faults.append(f"storage disk filled ({filled >> 20} MiB)")
    state = _job_end(cluster, job)
    log = _job_log(cluster, job)
    cluster.free_disk()
    print(f"job 1 after the full disk: {state.splitlines()[:1]}\n{log[-3000:]}")  # shown with -s
    assert ": FAILED" in state, state
    # The job's last words: one line naming the storage path, not Tune's traceback.
    last = [line for line in log.splitlines() if line.strip()][-1]
    assert last.startswith(f"stopped: storage failed: cannot write to {storage} (No space left on device)"), log[-3000:]

    # 3. Submitted again, the study resumes; the worker node is killed while the last run trains.
    second = _submit(cluster, study, str(storage), wait="--no-wait")
    assert second.returncode == 0, second.stderr
    job = _job_id(second)
    _until("the second run to finish", 300, lambda: _finished(cluster, name) >= 2)
    cluster.kill_worker()
    faults.append("worker node killed")
    cluster.start_worker()
    state = _job_end(cluster, job)
    print(f"job 2 after the worker kill: {state.splitlines()[:1]}")

    # Submitted a third time, the study finishes, exactly once: what finished is not trained again.
    again = _submit(cluster, study, str(storage))
    _assert_succeeded(again)
    done = re.search(r"3 pretraining runs \((\d+) already done\)", again.stdout)
    assert done and int(done.group(1)) >= 2, again.stdout[-3000:]
    runs = _runs(cluster, name)
    pretrain, transfer = _finished_once(runs, KIND_PRETRAIN), _finished_once(runs, KIND_TRANSFER)
    assert [r.info.status for r in runs[KIND_STUDY]] == [FINISHED]
    lost = 3 - len(pretrain) + 3 - len(transfer)
    after = {r.data.tags[TAG_CONFIG_HASH]: r.info.run_id for r in pretrain}
    assert after == before  # the runs created before the faults were resumed, not made again
    client = MlflowClient(cluster.mlflow_url)
    epochs = {
        r.info.run_id: sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")) for r in pretrain
    }
    assert all(steps == [0, 1, 2] for steps in epochs.values()), epochs  # every epoch once: no metric lost or doubled
    history = [m for r in pretrain for m in client.get_metric_history(r.info.run_id, "train_loss")]
    assert any(killed_at * 1000 <= m.timestamp <= back_at * 1000 for m in history)  # reported in the outage
    assert not list((storage / SPOOL_DIR).rglob("*.json"))  # the spool was emptied
    print(f"chaos figures: faults injected {len(faults)} ({'; '.join(faults)}), runs lost {lost}, duplicated 0")
