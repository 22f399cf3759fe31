"""Exactly-once resume: `transferlab run` SIGKILLed mid-pretraining, then run again.

The driver runs as a subprocess with its own private Ray, in its own session, so killing its
process group is a crash of the whole study (driver, GCS, raylet, Tune and Train actors), with no
`finally` anywhere. `transferlab plan` is checked on the fresh study, on the killed one and on the
finished one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.records.schema import KIND_PRETRAIN, KIND_STUDY, KIND_TRANSFER, TAG_CONFIG_HASH, TAG_KIND

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
STUDY = {
    "study": "killed",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": EPOCHS,
        "batch_size": 32,
        "sweep": {"pretrain_size": [100], "label_noise": [0.0, 0.2, 0.4]},
        "pack": "off",  # the kill lands in a TorchTrainer, which resumes from its checkpoint
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
    # One pretraining trial at a time: the kill lands while exactly one job is mid-way.
    "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
}


def _ray_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line names this test's private Ray temp dir."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if marker in cmd and "zombie" not in state:
                pids.append(int(d.name))
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(marker: str, pgid: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _ray_processes(marker)
        if not left and not _group_alive(pgid):
            return []
        time.sleep(0.5)
    return _ray_processes(marker)


def _pretrain_runs(client):
    exp = client.get_experiment_by_name("killed")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'")


def _history(client, run_id):
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train_loss"))


def _plan(argv, capsys) -> dict:
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (socket paths must stay under 108 bytes) that marks the
    study's Ray processes; removed afterwards."""
    path = tempfile.mkdtemp(prefix="tlkill", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Slow (~210 s): two `transferlab run` drivers, each starting its own Ray, and four pack-off TorchTrainer fits paced by
# Ray Train's default 2 s poll, which gives the kill its window between two epochs of the second run.
def test_sigkilled_study_resumes_exactly_once(tmp_path, capsys, ray_tmp):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [str(study), "--tracking-uri", uri]
    run_argv = [sys.executable, "-m", "orchestrator.cli", "run", *common, "--storage-path", str(tmp_path / "storage")]
    # Ray Train's default 2 s controller poll (conftest shortens it for the other tests) paces the
    # epochs, so the kill below lands between two epochs' checkpoints, not after the last one.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_RUN_ID", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    }
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled"
    )

    fresh = _plan(common, capsys)
    assert (fresh["pretrain_new"], fresh["pretrain_resume"], fresh["pretrain_cached"]) == (3, 0, 0)
    assert (fresh["pretrain_trials"], fresh["transfer_trials"], fresh["transfer_todo"]) == (3, 3, 3)
    assert not (tmp_path / "mlflow.db").exists()  # plan wrote nothing, not even an empty store

    client = MlflowClient(uri)
    first_log = open(tmp_path / "first.log", "wb")
    driver = subprocess.Popen(
        run_argv, env=env, stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
    )
    try:
        # Kill once one job has finished and the next has reported (and checkpointed) an epoch.
        deadline = time.monotonic() + 600
        while True:
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first pretraining run did not finish in time"
            runs = _pretrain_runs(client) if (tmp_path / "mlflow.db").exists() else []
            finished = [r for r in runs if r.info.status == "FINISHED"]
            midway = [
                r for r in runs if r.info.status == "RUNNING" and 1 <= len(_history(client, r.info.run_id)) < EPOCHS
            ]
            if finished and midway:
                break
            time.sleep(0.3)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        first_log.close()
    left = _wait_gone(ray_tmp, driver.pid)
    for pid in left:  # clean up before failing, so no stray Ray outlives the test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed driver's Ray survived the kill: {left}"

    before = {r.info.run_id: r for r in _pretrain_runs(client)}
    done = next(r for r in before.values() if r.info.status == "FINISHED")
    cut = next(r for r in before.values() if r.info.status == "RUNNING" and _history(client, r.info.run_id))
    done_history = _history(client, done.info.run_id)
    killed = _plan(common, capsys)
    assert killed["pretrain_cached"] == 1 and killed["pretrain_resume"] + killed["pretrain_new"] == 2
    assert killed["pretrain_trials"] == 2

    t0 = time.monotonic()
    second = subprocess.run(
        run_argv, env=env, capture_output=True, text=True, timeout=800, start_new_session=True, cwd=tmp_path
    )
    resume_seconds = time.monotonic() - t0
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    deadline = time.monotonic() + 30
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(ray_tmp), "the resumed driver left Ray processes behind"

    after = _pretrain_runs(client)
    # One FINISHED run per job, the same run ids as before the kill, nothing RUNNING anywhere.
    assert {r.info.run_id for r in after} == set(before)
    assert len({r.data.tags[TAG_CONFIG_HASH] for r in after}) == 3
    exp = client.get_experiment_by_name("killed").experiment_id
    every = client.search_runs([exp], max_results=1000)
    assert {r.info.status for r in every} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in every]
    kinds = [r.data.tags[TAG_KIND] for r in every]
    assert (kinds.count(KIND_STUDY), kinds.count(KIND_PRETRAIN), kinds.count(KIND_TRANSFER)) == (1, 3, 3)
    # The finished job was not executed again.
    again = client.get_run(done.info.run_id)
    assert again.info.start_time == done.info.start_time and again.info.end_time == done.info.end_time
    assert _history(client, done.info.run_id) == done_history
    assert f"{done.info.run_name}: epoch" not in second.stdout
    # Every metric step once; the interrupted job went on from its checkpoint (no epoch 1 again).
    for r in after:
        steps = [step for step, _, _ in _history(client, r.info.run_id)]
        assert steps == list(range(EPOCHS)), (r.info.run_name, steps)
    assert f"{cut.info.run_name}: epoch {EPOCHS}:" in second.stdout
    assert f"{cut.info.run_name}: epoch 1:" not in second.stdout

    cached = _plan(common, capsys)
    assert (cached["pretrain_cached"], cached["transfer_cached"], cached["trials"]) == (3, 3, 0)
    assert main(["plan", *common]) == 0
    text = capsys.readouterr().out
    assert "pretraining runs: 3: 0 to run, 0 interrupted (resume), 3 finished (cached)" in text
    assert "calibrated on 3 finished pretrain run(s)" in text
    print(f"resumed run took {resume_seconds:.0f}s")
