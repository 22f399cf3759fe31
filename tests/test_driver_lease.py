"""One driver per study: a second ``transferlab run`` is refused while the first is alive, waits
out a silent one, takes over a dead one's lease; and analysis counts a job once even when two
drivers (before the lease) left two finished runs of it.

Real sqlite stores and real processes (a driver SIGKILLed, one SIGSTOPped past the expiry);
no Ray: the lease is taken before Ray starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.analysis.frame import load_study
from orchestrator.cli import main
from orchestrator.cli.exits import EXIT_BUSY
from orchestrator.records.lease import EXPIRY_ENV, HEARTBEAT_ENV, Holder, StudyBusy, StudyLease
from orchestrator.records.results import transfer_frame
from orchestrator.records.schema import KIND_PRETRAIN, KIND_TRANSFER, TAG_DRIVER_LEASE
from orchestrator.records.tracker import Tracker

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "study": "leased",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {"model": "tiny-cnn", "image_size": 16, "epochs": 1, "sweep": {"pretrain_size": [100]}},
    "transfer": {"shots": [1], "seeds": [0]},
}


@pytest.fixture
def fast_lease(monkeypatch):
    """Heartbeat every 0.3 s, expiry after 1.5 s (defaults: 10 s and 30 s)."""
    monkeypatch.setenv(HEARTBEAT_ENV, "0.3")
    monkeypatch.setenv(EXPIRY_ENV, "1.5")
    return {**os.environ, HEARTBEAT_ENV: "0.3", EXPIRY_ENV: "1.5"}


def _lease(uri: str, study: str = "leased", lines: list | None = None) -> StudyLease:
    tracker = Tracker(uri)
    return StudyLease(tracker, tracker.experiment_id(study), study, say=(lines.append if lines is not None else None))


def _holder_process(uri: str, env: dict, until_lost: bool = False) -> subprocess.Popen:
    """Another driver: a process that takes the lease, says so, and holds it (until lost)."""
    code = (
        "import sys, time\n"
        "from orchestrator.records.lease import StudyLease\n"
        "from orchestrator.records.tracker import Tracker\n"
        f"t = Tracker({uri!r}); lease = StudyLease(t, t.experiment_id('leased'), 'leased'); lease.acquire()\n"
        "print('held', flush=True)\n"
        "while not lease.lost: time.sleep(0.05)\n"
        "print('lost', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_second_run_is_refused_naming_the_live_driver_and_touches_nothing(tmp_path, tracking_uri, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(SPEC))
    first = _lease(tracking_uri)
    first.acquire()  # a live driver of this study, heartbeat running
    try:
        capsys.readouterr()
        code = main(["run", str(study), "--tracking-uri", tracking_uri, "--storage-path", str(tmp_path / "storage")])
        err = capsys.readouterr().err
    finally:
        first.release()
    assert code == EXIT_BUSY
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: study 'leased' is being run by another driver (")
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in lines[0] and "UTC" in lines[0]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("leased")
    assert client.search_runs([exp.experiment_id]) == []  # not a run created or reopened
    assert exp.tags.get(TAG_DRIVER_LEASE) == ""  # released by its holder


def test_a_silent_driver_is_waited_out_and_a_live_one_refused(tracking_uri, fast_lease):
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("leased")
    # A driver on another machine, last heard of 1 s ago (stale: its heartbeat is every 0.3 s).
    ghost = Holder("ghost", "elsewhere", 4242, time.time() - 60, time.time() - 1.0)
    tracker.client.set_experiment_tag(exp, TAG_DRIVER_LEASE, ghost.dump())
    lines: list[str] = []
    lease = _lease(tracking_uri, lines=lines)
    t0 = time.monotonic()
    lease.acquire()
    waited = time.monotonic() - t0
    try:
        assert (
            lines[0].startswith("waiting up to ") and "s: study 'leased' is leased to a driver whose last" in lines[0]
        )
        assert "(host elsewhere, pid 4242, since " in lines[0] and lines[0].endswith(
            "taking it over if it stays silent"
        )
        assert lines[1].startswith("note: taking over the lease of study 'leased' from a driver silent for")
        assert 0.3 <= waited < 5, waited
        assert (
            Holder.parse(MlflowClient(tracking_uri).get_experiment(exp).tags[TAG_DRIVER_LEASE]).driver == lease.driver
        )
        # Now it is the live holder: another driver is refused at once, whatever its patience.
        t0 = time.monotonic()
        with pytest.raises(StudyBusy, match=f"pid {os.getpid()}"):
            _lease(tracking_uri, lines=[]).acquire()
        assert time.monotonic() - t0 < 2
    finally:
        lease.release()


def test_a_killed_drivers_lease_is_taken_over_at_once(tracking_uri, fast_lease, monkeypatch):
    # A long expiry: only noticing that the holder's process is gone can make this fast.
    monkeypatch.setenv(EXPIRY_ENV, "600")
    holder = _holder_process(tracking_uri, {**fast_lease, EXPIRY_ENV: "600"})
    with pytest.raises(StudyBusy, match=f"pid {holder.pid}"):
        _lease(tracking_uri, lines=[]).acquire()
    holder.send_signal(signal.SIGKILL)  # killed without cleanup: the lease stays in MLflow
    holder.wait(timeout=10)
    lines: list[str] = []
    lease = _lease(tracking_uri, lines=lines)
    t0 = time.monotonic()
    lease.acquire()
    lease.release()
    assert time.monotonic() - t0 < 3
    assert len(lines) == 1, lines
    assert lines[0].startswith("note: taking over the lease of study 'leased' from a driver that is gone (host ")
    assert f"pid {holder.pid}, since " in lines[0]


def test_a_driver_stalled_past_the_expiry_loses_its_lease_and_knows_it(tracking_uri, fast_lease):
    holder = _holder_process(tracking_uri, fast_lease)
    try:
        holder.send_signal(signal.SIGSTOP)  # stalled (a partition, a frozen VM): no heartbeat
        time.sleep(0.6)  # until its heartbeat is stale; a fresh one is refused at once (test above)
        lines: list[str] = []
        lease = _lease(tracking_uri, lines=lines)
        lease.acquire()  # waits the expiry out, then takes over
        assert any("from a driver silent for" in line for line in lines), lines
        holder.send_signal(signal.SIGCONT)
        out, err = holder.communicate(timeout=20)
        lease.release()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert out.strip() == "lost"
    assert "error: the lease of study 'leased' was taken over (host " in err
    # The stalled driver left the new holder's lease alone; the new holder released it.
    assert MlflowClient(tracking_uri).get_experiment_by_name("leased").tags[TAG_DRIVER_LEASE] == ""


def test_a_job_with_two_finished_runs_counts_once_newest_wins(tmp_path, tracking_uri):
    """What two drivers on one study left before the lease: two FINISHED runs per config hash."""
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("twice")
    study_run = tracker.create_run(exp, "study", "twice", "study twice", "spec", {"study": "twice"})
    pre_params = {"method": "supervised", "source": "mnist", "pretrain_size": 100, "label_noise": 0.2,
                  "model": "tiny-cnn", "seed": 0}  # fmt: skip
    tr_params = {"task": "digits", "protocol": "linear_probe", "shots": 1, "seed": 0, "layer": "final"}
    pre, fits = [], []
    for accuracy in (0.30, 0.50):  # the second driver's runs finish last
        p = tracker.create_run(exp, KIND_PRETRAIN, "twice", "pre", "prehash", pre_params, parent_run_id=study_run)
        tracker.log(p, metrics={"upstream_accuracy": accuracy})
        tracker.finish(p)
        t = tracker.create_run(exp, KIND_TRANSFER, "twice", "fit", "fithash", tr_params, parent_run_id=p)
        tracker.log(t, metrics={"accuracy": accuracy, "mean_per_class_accuracy": accuracy})
        tracker.finish(t)
        pre.append(p)
        fits.append(t)
        time.sleep(0.01)  # distinct end times
    # A third driver's fit of the same job, under the first (older) pretraining duplicate, finishing last.
    late = tracker.create_run(exp, KIND_TRANSFER, "twice", "fit", "fithash", tr_params, parent_run_id=pre[0])
    tracker.log(late, metrics={"accuracy": 0.7, "mean_per_class_accuracy": 0.7})
    tracker.finish(late)

    sr = load_study(tracker, "twice")
    assert list(sr.pretrain["run_id"]) == [pre[1]]
    assert len(sr.transfer) == 1
    row = sr.transfer.iloc[0]
    assert (row["run_id"], row["pretrain_run_id"], row["accuracy"]) == (late, pre[1], 0.7)
    assert sr.status[KIND_PRETRAIN] == {"FINISHED": 1} and sr.status[KIND_TRANSFER] == {"FINISHED": 1}
    assert sr.status_line() == "1/1 pretrain runs finished; 1/1 transfer runs finished"
    frame = transfer_frame(tracker, "twice")  # what `transferlab runs` and `run` print
    assert len(frame) == 1 and frame.iloc[0]["accuracy"] == 0.7 and frame.iloc[0]["upstream_accuracy"] == 0.5
