"""The metric spool shared by studies on one storage path: each study flushes only its own
batches, never deletes another store's, and a corrupt batch is moved aside instead of blocking
every start; a writer killed at any point leaves whole batches only, each fsynced before its rename.
Real sqlite stores, a real storage folder, real writer processes; no Ray."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric

from orchestrator.records import spool
from orchestrator.records.schema import KIND_PRETRAIN
from orchestrator.records.tracker import Tracker

pytestmark = pytest.mark.timeout(60)


def _study(tmp_path, name: str) -> tuple[Tracker, str, str]:
    """A study in a tracking store of its own: (tracker, experiment id, a pretraining run id)."""
    tracker = Tracker(f"sqlite:///{tmp_path / f'{name}.db'}")
    exp = tracker.experiment_id(name)
    return tracker, exp, tracker.create_run(exp, KIND_PRETRAIN, name, "pre", f"{name}-hash", {"seed": 0})


def _losses(tracker: Tracker, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, "train_loss"))


def _batch(step: int, value: float) -> list[Metric]:
    return [Metric("train_loss", value, int(time.time() * 1000), step)]


def test_a_study_flushes_only_its_own_spool_and_never_deletes_another_stores(tmp_path, capsys):
    storage = str(tmp_path / "storage")
    a, exp_a, run_a = _study(tmp_path, "alpha")
    b, exp_b, run_b = _study(tmp_path, "beta")
    scope_a, scope_b = spool.scope(a.uri, exp_a), spool.scope(b.uri, exp_b)
    assert scope_a != scope_b and exp_a == exp_b  # the two stores number their experiments alike
    spool.write(storage, scope_a, run_a, _batch(0, 2.0))
    spool.write(storage, scope_b, run_b, _batch(0, 3.0))
    # A batch spooled before spools were scoped, directly in _tracking_spool/: alpha's.
    legacy = tmp_path / "storage" / spool.SPOOL_DIR / f"{run_a}.old.json"
    legacy.write_text(f'{{"run_id": "{run_a}", "metrics": [["train_loss", 1.5, 1, 1]]}}')

    assert spool.flush(storage, scope_b, b.client) == 1  # beta starts: sends its own batch only
    assert _losses(b, run_b) == [(0, 3.0)]
    assert len(spool.pending(storage, scope_a)) == 1 and legacy.exists()  # alpha's untouched
    assert "dropped" not in capsys.readouterr().err

    assert spool.flush(storage, scope_a, a.client) == 2  # alpha starts: its batch and its old one
    assert _losses(a, run_a) == [(0, 2.0), (1, 1.5)]
    assert not spool.pending(storage, scope_a) and not spool.pending(storage, scope_b) and not legacy.exists()


def test_a_batch_whose_run_the_store_does_not_know_is_kept(tmp_path, capsys):
    storage = str(tmp_path / "storage")
    a, exp_a, _ = _study(tmp_path, "alpha")
    where = spool.scope(a.uri, exp_a)
    spool.write(storage, where, "0123456789abcdef0123456789abcdef", _batch(0, 1.0))
    assert spool.flush(storage, where, a.client) == 0
    assert len(spool.pending(storage, where)) == 1
    assert "is not in this tracking store; kept" in capsys.readouterr().err


def test_a_corrupt_batch_is_quarantined_once_and_blocks_nothing(tmp_path, capsys):
    storage = str(tmp_path / "storage")
    a, exp_a, run_a = _study(tmp_path, "alpha")
    where = spool.scope(a.uri, exp_a)
    spool.write(storage, where, run_a, _batch(0, 2.0))
    folder = tmp_path / "storage" / spool.SPOOL_DIR / where
    (folder / f"{run_a}.torn.json").write_bytes(b'{"run_id": "' + run_a.encode() + b'", "metr')  # cut short
    (folder / f"{run_a}.junk.json").write_bytes(b"\x00\xff not json")
    spool.write(storage, where, run_a, _batch(1, 1.0))
    assert not list(folder.glob(".*.tmp"))  # durable writes leave no temporary file behind

    assert spool.flush(storage, where, a.client) == 2  # both good batches sent despite the bad ones
    assert _losses(a, run_a) == [(0, 2.0), (1, 1.0)]
    err = capsys.readouterr().err
    assert err.count("is unreadable") == 2 and err.count("moved aside to") == 2, err
    quarantine = tmp_path / "storage" / spool.SPOOL_DIR / spool.QUARANTINE_DIR
    assert sorted(p.name for p in quarantine.iterdir()) == [f"{run_a}.junk.json", f"{run_a}.torn.json"]
    assert not spool.pending(storage, where)
    assert spool.flush(storage, where, a.client) == 0  # the next start: nothing to send, nothing said
    assert capsys.readouterr().err == ""


# A writer process: spools one batch per step (train_loss = step / 10) and says "step N" once
# write() has returned, as a Train report would before training goes on.
WRITER = """
import sys, time
from mlflow.entities import Metric
from orchestrator.records import spool
storage, where, run_id, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
first = int(sys.stdin.readline())
for step in range(first, first + steps):
    spool.write(storage, where, run_id, [Metric("train_loss", step / 10, int(time.time() * 1000), step)])
    print(f"step {step}", flush=True)
"""
REPO = Path(__file__).resolve().parents[1]


def _writer(storage: str, where: str, run_id: str, steps: int, prefix: list[str] = ()) -> subprocess.Popen:
    """A writer that spools ``steps`` batches from the first step it reads on stdin."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [*prefix, sys.executable, "-c", WRITER, storage, where, run_id, str(steps)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _go(proc: subprocess.Popen, first: int) -> None:
    assert proc.stdout.readline() == "ready\n"
    proc.stdin.write(f"{first}\n")
    proc.stdin.flush()


@pytest.mark.timeout(180)  # four writer processes importing MLflow: seconds, more on a loaded machine
def test_a_writer_killed_at_random_points_leaves_only_whole_batches_each_sent_once(tmp_path, capsys):
    """Four writers in turn, each SIGKILLed at a random moment of its loop (seeded): what every
    writer acknowledged is in MLflow after one flush, each step once, and nothing is quarantined."""
    storage = str(tmp_path / "storage")
    a, exp_a, run_a = _study(tmp_path, "alpha")
    where = spool.scope(a.uri, exp_a)
    rng, acknowledged, first = np.random.default_rng(23), [], 0
    writers = [_writer(storage, where, run_a, 10_000) for _ in range(4)]  # imports in parallel
    for proc in writers:
        _go(proc, first)
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        steps = [int(m) for m in re.findall(r"^step (\d+)$", out, re.M)]
        acknowledged += steps
        # The next writer starts at the step after the last one acknowledged: a batch written
        # but not acknowledged before the kill is written again, as a resumed epoch would be.
        first = (steps[-1] + 1) if steps else first
    assert acknowledged, "no writer got as far as one batch: kill later"
    folder = tmp_path / "storage" / spool.SPOOL_DIR / where
    batches = spool.pending(storage, where)
    assert all(p.endswith(".json") and "/." not in p for p in batches)  # leftover .tmp files are not batches
    sent = spool.flush(storage, where, a.client)
    history = _losses(a, run_a)
    steps = [s for s, _ in history]
    assert len(steps) == len(set(steps)) == sent  # each step once
    assert set(acknowledged) <= set(steps)  # nothing acknowledged is lost
    assert all(v == pytest.approx(s / 10) for s, v in history)
    assert "unreadable" not in capsys.readouterr().err  # no torn batch under a batch's name
    assert not (tmp_path / "storage" / spool.SPOOL_DIR / spool.QUARANTINE_DIR).exists()
    assert not spool.pending(storage, where) and not list(folder.glob("*.json"))


def _strace_unavailable() -> str | None:
    if shutil.which("strace") is None:
        return "needs strace"
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"strace cannot trace here: {probe.stderr.strip()[:200]}"


@pytest.mark.skipif(bool(_strace_unavailable()), reason=_strace_unavailable() or "")
@pytest.mark.timeout(180)
def test_a_local_batch_is_fsynced_before_its_rename_and_its_folder_after(tmp_path):
    """What makes a power loss leave a whole batch or none, read from the writer's real system
    calls (strace): each batch's data is fsynced under its temporary name, renamed into place,
    then its folder is fsynced, in that order."""
    storage = str(tmp_path / "storage")
    a, exp_a, run_a = _study(tmp_path, "alpha")
    where = spool.scope(a.uri, exp_a)
    trace = tmp_path / "trace"
    syscalls = "trace=fsync,fdatasync,rename,renameat,renameat2"
    proc = _writer(storage, where, run_a, 3, prefix=["strace", "-f", "-y", "-e", syscalls, "-o", str(trace)])
    out, _ = proc.communicate("0\n", timeout=120)
    assert proc.returncode == 0 and out.count("step ") == 3
    folder = str(tmp_path / "storage" / spool.SPOOL_DIR / where)
    # e.g. 123 fsync(3</.../.RUN.UUID.json.HEX.tmp>) = 0 ; 123 rename("/.../.x.tmp", "/.../x.json") = 0
    events = []
    for line in trace.read_text().splitlines():
        if m := re.search(r"f(?:data)?sync\(\d+<([^>]*)>\) = 0", line):
            events.append(("fsync", m.group(1)))
        elif m := re.search(r"rename(?:at2?)?\((?:[^,]*, )?\"([^\"]+)\", (?:[^,]*, )?\"([^\"]+)\"", line):
            events.append(("rename", m.group(1), m.group(2)))
    renames = [e for e in events if e[0] == "rename" and e[2].startswith(folder)]
    assert len(renames) == 3 and sorted(Path(e[2]).name for e in renames) == sorted(
        Path(p).name for p in spool.pending(storage, where)
    )
    for e in renames:
        i = events.index(e)
        assert ("fsync", e[1]) in events[:i], f"{e[1]} renamed before it was fsynced"
        assert ("fsync", folder) in events[i + 1 :], f"folder not fsynced after renaming {e[2]}"
    assert spool.flush(storage, where, a.client) == 3
