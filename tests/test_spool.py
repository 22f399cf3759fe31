"""The metric spool shared by studies on one storage path: each study flushes only its own
batches, never deletes another store's, and a corrupt batch is moved aside instead of blocking
every start. Real sqlite stores, a real storage folder; no Ray."""

from __future__ import annotations

import time

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
