"""A report rerun on an unchanged study is the kept one, served without computing; any change a
user makes (a run finished, deleted, restored, resumed, a run still running, other options,
edited code) computes it again. Real sqlite MLflow store, the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.analysis import report_cache, run_cache, sqlite_state
from orchestrator.cli import main
from orchestrator.records.schema import METRIC_ACCURACY, RUNNING
from orchestrator.records.tracker import Tracker, resolve_tracking_uri
from tests.synthetic_runs import SyntheticStudy, per_example_frame

CLASSES = [str(c) for c in range(6)]
KEPT = "nothing changed since the last report"
REPO = Path(__file__).resolve().parents[1]
# On an sqlite store a served report asks the database with sqlite3: not even MLflow is imported.
HEAVY = ("mlflow", "sqlalchemy", "scipy", "pandas", "matplotlib", "torch", "ray")


@pytest.fixture
def study(tmp_path, monkeypatch):
    """8 half-class models, each with a few-shot run and a full run carrying per-example outputs."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    # Runs that ended shortly before the last report count as new: the test's runs end within ms.
    monkeypatch.setattr(run_cache, "SETTLE_MS", 0)
    s = SyntheticStudy(f"sqlite:///{tmp_path}/mlflow.db", "kept", tmp_path / "artifacts")
    rng = np.random.default_rng(0)
    s.few_shot_runs = []
    for m in range(8):
        included = rng.permutation(6) < 3
        pre = s.pretrain("mnist", 1000, upstream=0.9, seed=m, classes=CLASSES, included=included.tolist())
        s.few_shot_runs.append(s.transfer(pre, "digits", 5, 0, 0.6 + 0.01 * m))
        p = 0.5 + 0.2 * included[2] + rng.normal(0, 0.02, 8)
        s.transfer(pre, "digits", "full", 0, float(p.mean()), per_example=per_example_frame(p))
    return s


def _report(study, out: Path, capsys, *flags: str) -> tuple[str, dict]:
    """``transferlab report kept`` (logged on the study run): its lines, then its --json numbers."""
    uri = study.client.tracking_uri
    args = ["report", "kept", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "20", *flags]
    assert main(args) == 0
    lines = capsys.readouterr().out
    assert main([*args, "--json", "--no-log"]) == 0  # the same inputs: always the kept report
    return lines, json.loads(capsys.readouterr().out)


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def test_an_unchanged_study_is_served_from_the_kept_report(study, tmp_path, capsys):
    out = tmp_path / "report"
    first, numbers = _report(study, out, capsys)
    assert KEPT not in first and "logged on the study run" in first
    written = _files(out)
    runs_json = next((tmp_path / "cache" / "report").glob("*/runs.json"))
    read_at = runs_json.stat().st_mtime_ns
    second, again = _report(study, out, capsys)
    assert KEPT in second and "logged on the study run" in second
    assert again == numbers and numbers["finished_transfer_runs"] == 16
    assert _files(out) == written  # not one file rewritten
    assert runs_json.stat().st_mtime_ns == read_at  # no run read
    logged = {f.path for f in study.client.list_artifacts(study.study_run, "report")}
    assert "report/report.html" in logged
    # Another --out gets the same files; an edited or deleted file is put back.
    elsewhere = tmp_path / "elsewhere"
    uri = study.client.tracking_uri
    assert main(["report", "kept", "--tracking-uri", uri, "--out", str(elsewhere), "--bootstrap", "20"]) == 0
    assert KEPT in capsys.readouterr().out
    assert {k: v[0] for k, v in _files(elsewhere).items()} == {k: v[0] for k, v in written.items()}
    (out / "numbers.json").write_text("{}")
    next(out.glob("figures/*.png")).unlink()
    _report(study, out, capsys)
    assert {k: v[0] for k, v in _files(out).items()} == {k: v[0] for k, v in written.items()}


def test_a_served_report_imports_neither_mlflow_nor_a_fitting_or_plotting_library(study, tmp_path, capsys):
    out = tmp_path / "report"
    _report(study, out, capsys)
    code = (
        "import sys; from orchestrator.analysis import run_cache; from orchestrator.cli.main import main; "
        "run_cache.SETTLE_MS = 0; "  # as in the fixture: the test's runs ended moments ago
        f"rc = main(['report', 'kept', '--tracking-uri', {study.client.tracking_uri!r}, '--out', {str(out)!r}, "
        "'--bootstrap', '20']); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert KEPT in done.stdout and done.stdout.strip().endswith("[] 0")
    # A kept report not yet logged on its study run goes through MLflow to log it, then is served.
    assert main(["report", "kept", "--tracking-uri", study.client.tracking_uri, "--out", str(out), "--no-log"]) == 0
    assert KEPT not in capsys.readouterr().out  # --bootstrap 200 (the default): other options
    done = subprocess.run(
        [sys.executable, "-c", code.replace("'20'", "'200'")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and KEPT in done.stdout, done.stderr
    assert "'mlflow'" in done.stdout.strip().splitlines()[-1]  # it logged the report through MLflow


def test_the_sqlite_reading_resolves_uris_as_mlflow_does(tmp_path, monkeypatch):
    """sqlite_state.tracking_uri gives what resolve_tracking_uri (which asks MLflow) gives, or None
    where it cannot tell without MLflow; a study or store it cannot read gives None."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # MLflow's default asked in a fresh process: this one's global URI may have been set by another test
    fresh = subprocess.run(
        [sys.executable, "-c", "from orchestrator.records.tracker import resolve_tracking_uri as r; print(r(None))"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert sqlite_state.tracking_uri(None) == fresh.stdout.strip() == f"sqlite:///{tmp_path}/mlflow.db"
    for given in ("sqlite:///rel.db", f"sqlite:///{tmp_path}/abs.db"):
        assert sqlite_state.tracking_uri(given) == resolve_tracking_uri(given)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert sqlite_state.tracking_uri(None) == resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/env.db"
    assert sqlite_state.tracking_uri("http://127.0.0.1:5000") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlruns").mkdir()  # MLflow's default may then be the file store: not told here
    assert sqlite_state.tracking_uri(None) is None
    (tmp_path / "junk.db").write_bytes(b"not a database")
    assert sqlite_state.state_of(f"sqlite:///{tmp_path}/junk.db", "kept", 0, 0) is None
    assert sqlite_state.state_of(f"sqlite:///{tmp_path}/missing.db", "kept", 0, 0) is None


@pytest.mark.parametrize("change", ["new run", "deleted", "restored", "resumed", "running", "seed", "bootstrap"])
def test_a_change_is_noticed_and_the_report_computed_again(study, tmp_path, capsys, change):
    out = tmp_path / "report"
    _, before = _report(study, out, capsys)
    flags: tuple[str, ...] = ()
    gone = study.few_shot_runs[0]
    expect = 16
    if change == "new run":
        study.transfer(study.pretrain("mnist", 1000, upstream=0.8, seed=99), "digits", 5, 0, 0.42)
        expect = 17
    elif change in ("deleted", "restored"):
        study.client.delete_run(gone)
        expect = 15
        if change == "restored":
            _report(study, out, capsys)
            study.client.restore_run(gone)
            expect = 16
    elif change == "resumed":
        study.client.update_run(gone, status=RUNNING)
        study.client.log_metric(gone, METRIC_ACCURACY, 0.01)
        study.client.set_terminated(gone)
    elif change == "running":
        study.transfer(study.pretrain("mnist", 1000, upstream=0.8, seed=98), "digits", 5, 0, 0.4, status=RUNNING)
    else:
        flags = ("--seed", "3") if change == "seed" else ("--bootstrap", "10")
    lines, after = _report(study, out, capsys, *flags)
    assert KEPT not in lines
    assert after["finished_transfer_runs"] == expect
    if change == "resumed":
        assert after != before
    if change == "running":  # results still moving: computed every time, never served
        assert after["partial"]
        assert KEPT not in _report(study, out, capsys)[0]
    if change in ("seed", "bootstrap"):
        assert (after["seed"], after["n_boot"]) == ((3, 20) if change == "seed" else (0, 10))


def test_the_code_digest_moves_with_any_source_file(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    first = report_cache.source_digest((pkg,))
    assert report_cache.source_digest((pkg,)) == first
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    edited = report_cache.source_digest((pkg,))
    (pkg / "sub" / "c.py").write_text("")
    assert len({first, edited, report_cache.source_digest((pkg,))}) == 3
    tracker = Tracker(f"sqlite:///{tmp_path}/none.db")
    assert report_cache.kept_report(tracker, "no-such-study", 20, 0) is None
