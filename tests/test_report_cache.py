"""The report's local run cache on a real sqlite MLflow store: a rerun reads only what changed,
and still sees every change a user makes — a run finished after the last report, a run deleted
(or restored), a run resumed with a new metric and new per-example outputs, a corrupt cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import fits, run_cache
from orchestrator.analysis.frame import influence_inputs, load_study
from orchestrator.analysis.memo import Memo
from orchestrator.cli import main
from orchestrator.records.schema import METRIC_ACCURACY, PER_EXAMPLE_ARTIFACT
from orchestrator.records.tracker import Tracker
from tests.synthetic_runs import SyntheticStudy, per_example_frame

CLASSES = [str(c) for c in range(6)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def study(tmp_path, monkeypatch):
    """12 half-class models, each with a few-shot run and a full run carrying per-example outputs."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    # Runs that ended before the last read are not read again: the test's runs end within ms.
    monkeypatch.setattr(run_cache, "SETTLE_MS", 0)
    s = SyntheticStudy(f"sqlite:///{tmp_path}/mlflow.db", "cached", tmp_path / "artifacts")
    rng = np.random.default_rng(0)
    s.full_runs = []
    for m in range(12):
        included = rng.permutation(6) < 3
        pre = s.pretrain("mnist", 1000, upstream=0.9, seed=m, classes=CLASSES, included=included.tolist())
        s.transfer(pre, "digits", 5, 0, 0.6 + 0.01 * m)
        p = 0.5 + 0.2 * included[2] + rng.normal(0, 0.02, 8)
        s.full_runs.append(s.transfer(pre, "digits", "full", 0, float(p.mean()), per_example=per_example_frame(p)))
    return s


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    key = "run_id"
    pd.testing.assert_frame_equal(a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True))


def _cached(tracker: Tracker):
    sr = load_study(tracker, "cached", cached=True)
    return sr, influence_inputs(sr, "digits", "linear_probe")


def test_a_rerun_reads_only_what_changed_and_matches_mlflow(study):
    tracker = Tracker(study.client.tracking_uri)
    cold, x_cold = _cached(tracker)
    assert (cold.cache.runs_read, cold.cache.artifacts_read) == (1 + 12 * 3, 12 + 12)
    warm, x_warm = _cached(tracker)
    assert (warm.cache.runs_read, warm.cache.artifacts_read) == (1, 0)  # only the study run, read every time
    direct = load_study(tracker, "cached")
    for sr in (cold, warm):
        _same(sr.pretrain, direct.pretrain)
        _same(sr.transfer, direct.transfer)
        assert sr.status == direct.status
    x = influence_inputs(direct, "digits", "linear_probe")
    for got in (x_cold, x_warm):
        assert got.classes == x.classes
        np.testing.assert_array_equal(got.masks, x.masks)
        np.testing.assert_array_equal(got.examples, x.examples)
        np.testing.assert_allclose(got.outputs, x.outputs)


def test_new_deleted_restored_and_resumed_runs_are_seen(study):
    tracker = Tracker(study.client.tracking_uri)
    first, _ = _cached(tracker)
    # A run finished after the first report appears in the next one.
    late = study.pretrain("mnist", 1000, upstream=0.8, seed=99, classes=CLASSES, included=[True] * 3 + [False] * 3)
    late_transfer = study.transfer(late, "digits", 5, 0, 0.42)
    # A deleted run disappears.
    gone = first.transfer.loc[first.transfer["shots"] == "5", "run_id"].iloc[0]
    study.client.delete_run(gone)
    # A run resumed and finished again is read again: its metric and its per-example outputs.
    resumed = study.full_runs[3]
    study.client.update_run(resumed, status="RUNNING")
    time.sleep(0.01)
    study.client.log_metric(resumed, METRIC_ACCURACY, 0.123)
    study.client.log_artifact(resumed, _per_example_file(study, np.full(8, 0.01)), "outputs")
    study.client.set_terminated(resumed)
    second, x = _cached(tracker)
    t = second.transfer.set_index("run_id")
    assert t.loc[late_transfer, "accuracy"] == pytest.approx(0.42)
    assert gone not in t.index and len(t) == len(first.transfer)
    assert t.loc[resumed, "accuracy"] == pytest.approx(0.123)
    row = sorted(t.loc[study.full_runs, "pretrain_run_id"].unique()).index(t.loc[resumed, "pretrain_run_id"])
    np.testing.assert_allclose(x.outputs[row], 0.01)
    assert second.cache.artifacts_read == 1  # the resumed run's outputs; the rest from the cache
    study.client.restore_run(gone)
    third, _ = _cached(tracker)
    assert gone in set(third.transfer["run_id"])


def _per_example_file(study, p) -> str:
    path = study.client.tracking_uri.replace("sqlite:///", "").replace("mlflow.db", "per_example.parquet")
    per_example_frame(p).to_parquet(path, index=False)
    assert PER_EXAMPLE_ARTIFACT.endswith("/per_example.parquet")
    return path


def test_a_corrupt_cache_is_rebuilt_with_one_warning(study, capsys):
    tracker = Tracker(study.client.tracking_uri)
    first, x_first = _cached(tracker)
    folder = first.cache.folder
    (folder / "runs.json").write_text('{"version": 1, "runs": ')
    for f in folder.glob("artifact-*.parquet"):
        f.write_bytes(b"not parquet")
    again, x = _cached(tracker)
    err = capsys.readouterr().err
    assert err.count("warning: report cache") == 1 + 2  # runs.json and the two artifact tables
    _same(again.transfer, first.transfer)
    np.testing.assert_allclose(x.outputs, x_first.outputs)
    assert again.cache.artifacts_read == 24
    json.loads((folder / "runs.json").read_text())  # rewritten whole


def test_two_stores_never_share_a_cache(study, tmp_path):
    other = SyntheticStudy(f"sqlite:///{tmp_path}/other.db", "cached", tmp_path / "other-artifacts")
    other.transfer(other.pretrain("mnist", 1000, upstream=0.5), "digits", 5, 0, 0.3)
    a = load_study(Tracker(study.client.tracking_uri), "cached", cached=True)
    b = load_study(Tracker(other.client.tracking_uri), "cached", cached=True)
    assert a.cache.folder != b.cache.folder
    assert len(b.transfer) == 1 and len(a.transfer) == 24


def test_a_store_made_again_at_the_same_path_is_read_anew(study, tmp_path, capsys):
    """A database deleted and created again reuses experiment ids: neither its cached runs nor the
    kept report of the old one may answer for it (a report once named the old study run)."""
    uri = study.client.tracking_uri
    out = tmp_path / "report"
    assert main(["report", "cached", "--tracking-uri", uri, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finished_transfer_runs"] == 24
    (tmp_path / "mlflow.db").rename(tmp_path / "old.db")
    # The new store is written and reported on by a fresh process: this one's MLflow keeps its
    # engine on the old file.
    code = f"""
import json, sys
from orchestrator.analysis import run_cache
from orchestrator.cli import main
from tests.synthetic_runs import SyntheticStudy
run_cache.SETTLE_MS = 0
again = SyntheticStudy({uri!r}, "cached", {str(tmp_path / "artifacts-again")!r})
again.transfer(again.pretrain("mnist", 1000, upstream=0.5), "digits", 5, 0, 0.3)
print(again.experiment_id, again.study_run)
for _ in range(2):  # computed, then served from what was kept for the new store
    assert main(["report", "cached", "--tracking-uri", {uri!r}, "--out", {str(out)!r}, "--json"]) == 0
print({{f.path for f in again.client.list_artifacts(again.study_run, "report")}})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[0] == study.experiment_id  # the same experiment id, another experiment
    reports = [json.loads(t) for t in "\n".join(lines[1:-1]).replace("}\n{", "}\0{").split("\0")]
    assert [r["finished_transfer_runs"] for r in reports] == [1, 1]
    assert "report/numbers.json" in lines[-1]


def test_report_command_is_the_same_from_the_cache_and_refresh_reads_everything(study, tmp_path, capsys):
    uri = study.client.tracking_uri
    numbers = []
    for flags in ([], [], ["--refresh"], ["--no-cache"]):
        out = tmp_path / f"report{len(numbers)}"
        assert main(["report", "cached", "--tracking-uri", uri, "--out", str(out), "--no-log", "--json", *flags]) == 0
        doc = json.loads(capsys.readouterr().out)
        doc.pop("seconds")
        numbers.append(doc)
    assert numbers[0]["finished_transfer_runs"] == 24 and numbers[0]["influence"]
    assert all(n == numbers[0] for n in numbers[1:])


def test_memo_answers_the_same_fit_from_disk_and_recomputes_a_changed_or_corrupt_one(tmp_path):
    rng = np.random.default_rng(1)
    us = rng.uniform(0.3, 0.95, 30)
    ds = 1 - fits.saturation(1 - us, 0.5, 1.5, 0.1) + rng.normal(0, 0.01, 30)
    memo = Memo(tmp_path)
    first = memo(fits.fit_with_ci, us, ds, on_hull=False, n_boot=20, seed=0)
    again = memo(fits.fit_with_ci, us, ds, on_hull=False, n_boot=20, seed=0)
    assert (memo.misses, memo.hits) == (1, 1)
    assert again == first == fits.fit_with_ci(us, ds, on_hull=False, n_boot=20, seed=0)
    other = memo(fits.fit_with_ci, us, ds, on_hull=False, n_boot=20, seed=1)  # another seed: another result
    assert memo.misses == 2 and other != first
    for f in tmp_path.glob("memo-*.json"):
        f.write_text("{")
    assert memo(fits.fit_with_ci, us, ds, on_hull=False, n_boot=20, seed=0) == first
    assert memo.misses == 3
