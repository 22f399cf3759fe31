"""What of a study's runs can change its report, read from an MLflow sqlite store with ``sqlite3``.

:mod:`~orchestrator.analysis.report_cache` serves a kept report when nothing it was computed
from changed, and asks MLflow's API to find out. Importing MLflow alone takes 1.5–2.7 s on a
2-core machine, longer than the rest of a served report; for the common local case — an
``sqlite:///`` tracking URI and artifacts on this machine's disk — this module asks the same
questions of the database directly, read-only, with nothing but the standard library:

- the experiment (by name, active) and its runs that are not FINISHED, whole (status, times,
  tags, params, latest metrics): any RUNNING or SCHEDULED means "compute the report";
- the runs that ended since the kept report was started, less ``settle_ms``;
- the deleted runs;
- the study runs (tag ``transferlab.kind`` = ``study``), whole, and the SHA-256 of the study
  file and the counterfactual plan logged on the first of them, read from its artifact folder;
- the same runs of the follow-up study the plan names.

Its answer is digested on its own (``KeptReport.fast_digest``), next to the MLflow-API digest,
when the report is kept; it never has to equal that one, only to move whenever it moves. Any
surprise — another store, artifacts not on a local path, a table or column missing, a locked or
corrupt database — gives ``None``, and the caller falls back to MLflow's API. The tables read
(``experiments``, ``runs``, ``tags``, ``params``, ``latest_metrics``) have kept their columns
since MLflow 1.x; tests/test_report_kept.py checks this module against the API-based digest on
a real store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from orchestrator.records.schema import COUNTERFACTUAL_PLAN_ARTIFACT, KIND_STUDY, SPEC_ARTIFACT, TAG_KIND

IN_FLIGHT = ("RUNNING", "SCHEDULED")  # run statuses whose results still move
SQLITE_PREFIX = "sqlite:///"


class _NotLocal(Exception):
    """An artifact folder this module cannot read directly (remote, proxied): fall back."""


def tracking_uri(given: str | None) -> str | None:
    """The absolute ``sqlite:///`` URI ``given`` (or, when None, MLflow's default) resolves to, as
    :func:`orchestrator.records.tracker.resolve_tracking_uri` would, without importing MLflow; None
    when that is not an sqlite store on this machine or cannot be told without MLflow (a ``./mlruns``
    folder here may make MLflow's default the file store)."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        if Path("mlruns").exists():
            return None
        uri = SQLITE_PREFIX + "mlflow.db"
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX) :]
    if "?" in path:
        return None
    return SQLITE_PREFIX + (path if path.startswith("/") else str(Path(path).resolve()))


def db_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:///`` URI, None for any other store or a missing file."""
    if not uri.startswith(SQLITE_PREFIX + "/"):
        return None
    p = Path(uri[len(SQLITE_PREFIX) :])
    return p if p.is_file() else None


def connect(path: Path) -> sqlite3.Connection:
    """A read-only connection (no journal, no lock held beyond each read)."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)


def experiment(db: sqlite3.Connection, name: str) -> str | None:
    """The id of the active experiment ``name``, None if there is none."""
    row = db.execute(
        "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'", (name,)
    ).fetchone()
    return None if row is None else str(row[0])


def created_ms(db: sqlite3.Connection, experiment_id: str) -> int | None:
    """The experiment's ``creation_time`` (milliseconds), as MLflow's ``Experiment`` gives it."""
    row = db.execute("SELECT creation_time FROM experiments WHERE experiment_id = ?", (int(experiment_id),)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _whole(db: sqlite3.Connection, run_ids: list[str]) -> list[dict]:
    """Each run with its status, times, tags, params and latest metrics, sorted by run id."""
    out = []
    for rid in sorted(run_ids):
        info = db.execute(
            "SELECT status, start_time, end_time, lifecycle_stage, artifact_uri FROM runs WHERE run_uuid = ?", (rid,)
        ).fetchone()
        out.append(
            {
                "run_id": rid,
                "info": list(info) if info else None,
                "tags": sorted(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (rid,)).fetchall()),
                "params": sorted(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (rid,)).fetchall()),
                "metrics": sorted(
                    db.execute(
                        "SELECT key, value, step, timestamp, is_nan FROM latest_metrics WHERE run_uuid = ?", (rid,)
                    ).fetchall()
                ),
            }
        )
    return out


def _runs_state(db: sqlite3.Connection, experiment_id: str, since_ms: int, settle_ms: int) -> dict | None:
    unfinished = db.execute(
        "SELECT run_uuid, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
        "AND status != 'FINISHED'",
        (experiment_id,),
    ).fetchall()
    if any(status in IN_FLIGHT for _, status in unfinished):
        return None
    ended = db.execute(
        "SELECT run_uuid, end_time, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
        "AND end_time IS NOT NULL AND end_time >= ?",
        (experiment_id, since_ms - settle_ms),
    ).fetchall()
    deleted = db.execute(
        "SELECT run_uuid FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'deleted'", (experiment_id,)
    ).fetchall()
    return {
        "experiment_id": experiment_id,
        "ended": sorted(list(r) for r in ended),
        "unfinished": _whole(db, [r for r, _ in unfinished]),
        "deleted": sorted(r for (r,) in deleted),
    }


def _artifact(artifact_uri: str | None, path: str) -> bytes | None:
    """A small artifact of a run whose artifact folder is on this machine; None when it has none."""
    if not artifact_uri:
        raise _NotLocal
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        folder = Path(unquote(parsed.path))
    elif parsed.scheme == "" and artifact_uri.startswith("/"):
        folder = Path(artifact_uri)
    else:
        raise _NotLocal  # s3://, mlflow-artifacts:/ (a server's proxy), a relative path
    try:
        return (folder / path).read_bytes()
    except FileNotFoundError:
        return None


def study_state(db: sqlite3.Connection, study: str, since_ms: int, settle_ms: int) -> dict | None:
    """The state of study ``study`` (module docstring); None when a report must be computed anyway
    or this module cannot tell (no such study, a run in flight, artifacts not on a local path)."""
    eid = experiment(db, study)
    runs = _runs_state(db, eid, since_ms, settle_ms) if eid is not None else None
    if runs is None:
        return None
    study_ids = [
        r
        for (r,) in db.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.key = ? AND t.value = ?",
            (eid, TAG_KIND, KIND_STUDY),
        ).fetchall()
    ]
    state = {"runs": runs, "study_runs": _whole(db, study_ids)}
    if not study_ids:
        return state
    first, artifact_uri = db.execute(
        "SELECT run_uuid, artifact_uri FROM runs WHERE run_uuid IN ({}) ORDER BY COALESCE(start_time, 0), run_uuid "
        "LIMIT 1".format(",".join("?" * len(study_ids))),
        study_ids,
    ).fetchone()
    try:
        spec = _artifact(artifact_uri, SPEC_ARTIFACT)
        plan_bytes = _artifact(artifact_uri, COUNTERFACTUAL_PLAN_ARTIFACT)
    except _NotLocal:
        return None
    state["spec"] = None if spec is None else hashlib.sha256(spec).hexdigest()
    try:
        plan = json.loads(plan_bytes) if plan_bytes is not None else None
    except ValueError:
        plan = None
    state["plan"] = plan
    if isinstance(plan, dict) and isinstance(plan.get("followup_study"), str):
        follow = experiment(db, plan["followup_study"])
        if follow is not None:
            state["followup"] = _runs_state(db, follow, since_ms, settle_ms)
            if state["followup"] is None:
                return None
    return state


def state_of(uri: str, study: str, since_ms: int, settle_ms: int) -> tuple[str, dict] | None:
    """``(experiment id, state)`` of ``study`` in the sqlite store ``uri``, or None (fall back to MLflow)."""
    path = db_path(uri)
    if path is None:
        return None
    try:
        with contextlib.closing(connect(path)) as db:
            state = study_state(db, study, since_ms, settle_ms)
            return None if state is None else (state["runs"]["experiment_id"], state)
    except sqlite3.Error:
        return None  # locked past the timeout, not MLflow's schema, not a database: ask MLflow
