"""The last report of a study, kept with a digest of what it was computed from, served again
when nothing changed.

``transferlab report`` rerun on a study where nothing moved would compute the same tables,
fits, claims and figures again. Instead it asks MLflow a few small questions, digests the
answers, and when the digest equals the one kept with the last report, copies the kept folder
(``report.html``, ``tables/``, ``figures/``, ``numbers.json``) to ``--out``: no run is read, no
artifact downloaded, nothing computed or logged again, and neither SciPy nor matplotlib is
imported. The digest covers

- the code: every ``.py`` file of the ``orchestrator`` and ``trainers`` packages, and the
  versions of the libraries the report computes with (:data:`LIBRARIES`);
- the command: study, tracking store, ``--bootstrap``, ``--seed``;
- the study's runs, as four searches tell them: the runs that ended since the kept report was
  started, less :data:`~orchestrator.analysis.run_cache.SETTLE_MS` (new runs, and runs resumed
  and finished again, which stamp a new end time); every run not FINISHED, whole (its status,
  params, metrics, tags); the deleted runs (a run deleted, restored or purged changes the list);
  and the study run, whole, with the study file and the counterfactual plan logged on it;
- the same runs of the follow-up study that plan names, if any.

On an sqlite store with artifacts on this machine (the local default) the same questions are
first asked of the database with ``sqlite3`` (:mod:`~orchestrator.analysis.sqlite_state`, digested
apart as ``fast_digest``), so a served report does not import MLflow at all; any doubt falls
back to MLflow's API.

A study with a run RUNNING or SCHEDULED is never served from here: its results are still moving.
The blind spot is the run cache's (:mod:`~orchestrator.analysis.run_cache`): a value logged onto
a run after it ended, or a datamodel table rewritten in place, moves no end time; run
``transferlab report --refresh`` after such a repair.

Files live beside the run cache (``$TRANSFERLAB_CACHE/report/KEY/``): ``kept-report.json``
(the digest, the lines the command prints, a SHA-256 per file) and ``kept-report/`` (the files).
Nothing kept is executable; a kept file whose digest does not match counts as no kept report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from orchestrator.analysis import run_cache, sqlite_state
from orchestrator.records.schema import COUNTERFACTUAL_PLAN_ARTIFACT, KIND_STUDY, SPEC_ARTIFACT, TAG_KIND
from orchestrator.records.tracker import Tracker

VERSION = 1
LIBRARIES = ("mlflow", "numpy", "pandas", "pyarrow", "scipy", "matplotlib")
IN_FLIGHT = ("RUNNING", "SCHEDULED")  # run statuses whose results still move
_PACKAGES = ("orchestrator", "trainers")


def source_digest(roots: tuple[Path, ...]) -> str:
    """SHA-256 of every ``.py`` file under ``roots``, with its path relative to its root's parent."""
    h = hashlib.sha256()
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f"{f.relative_to(root.parent)}\n".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@cache
def code_digest() -> str:
    """The digest of the code a report is computed by: this project's sources and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parents[2]
    versions = []
    for lib in LIBRARIES:
        try:
            versions.append(f"{lib}=={version(lib)}")
        except PackageNotFoundError:
            versions.append(f"{lib} absent")
    return hashlib.sha256(
        (source_digest(tuple(here / p for p in _PACKAGES)) + "\n".join(versions)).encode()
    ).hexdigest()


def _artifact_sha(client, run_id: str, path: str) -> str | None:
    """SHA-256 of a small artifact of the run, None when it has none (MLflow raises a
    store-specific error for a missing artifact, as :func:`report.declared_claims` expects)."""
    with tempfile.TemporaryDirectory(prefix="transferlab-kept-") as tmp:
        try:
            return hashlib.sha256(Path(client.download_artifacts(run_id, path, tmp)).read_bytes()).hexdigest()
        except Exception:
            return None


def _runs_state(client, experiment_id: str, since_ms: int) -> dict | None:
    """What of an experiment's runs can change a report (see the module docstring); None while
    a run is in flight."""
    from mlflow.entities import ViewType

    unfinished = run_cache.search_all(client, experiment_id, "attributes.status != 'FINISHED'")
    if any(r.info.status in IN_FLIGHT for r in unfinished):
        return None
    ended = run_cache.search_all(client, experiment_id, f"attributes.end_time >= {since_ms - run_cache.SETTLE_MS}")
    deleted = run_cache.search_all(client, experiment_id, "", ViewType.DELETED_ONLY)
    return {
        "experiment_id": experiment_id,
        "ended": sorted([r.info.run_id, r.info.end_time, r.info.status] for r in ended),
        "unfinished": sorted((run_cache.run_to_dict(r) for r in unfinished), key=lambda d: d["info"]["run_id"]),
        "deleted": sorted(r.info.run_id for r in deleted),
    }


def _experiment(client, study: str):
    exp = client.get_experiment_by_name(study)
    return None if exp is None or exp.lifecycle_stage == "deleted" else exp


def _study_state(client, exp, since_ms: int) -> dict | None:
    runs = _runs_state(client, exp.experiment_id, since_ms)
    if runs is None:
        return None
    study_runs = run_cache.search_all(client, exp.experiment_id, f"tags.`{TAG_KIND}` = '{KIND_STUDY}'")
    state = {
        "runs": runs,
        "study_runs": sorted((run_cache.run_to_dict(r) for r in study_runs), key=lambda d: d["info"]["run_id"]),
    }
    if not study_runs:
        return state
    first = min(study_runs, key=lambda r: r.info.start_time or 0).info.run_id  # the report's study run
    state["spec"] = _artifact_sha(client, first, SPEC_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="transferlab-kept-") as tmp:
        try:
            plan = json.loads(Path(client.download_artifacts(first, COUNTERFACTUAL_PLAN_ARTIFACT, tmp)).read_text())
        except Exception:
            plan = None
    state["plan"] = plan
    if isinstance(plan, dict) and isinstance(plan.get("followup_study"), str):
        follow = _experiment(client, plan["followup_study"])
        if follow is not None:
            state["followup"] = _runs_state(client, follow.experiment_id, since_ms)
            if state["followup"] is None:
                return None
    return state


@dataclass
class KeptReport:
    """A report kept in ``folder`` (``kept-report.json`` and ``kept-report/``)."""

    folder: Path
    digest: str
    since_ms: int  # when the report was started: runs that ended after this (less SETTLE_MS) are new
    study_run_id: str | None
    status_line: str
    partial: bool
    figures: int
    tables: int
    files: dict[str, str]  # path relative to the report folder -> SHA-256
    logged_on: str | None = None  # the study run the report folder was logged on, if any
    # the digest of the same inputs read by sqlite_state (an sqlite store: served without MLflow)
    fast_digest: str | None = None

    @property
    def files_dir(self) -> Path:
        return self.folder / "kept-report"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder(tracker: Tracker, exp) -> Path:
    return run_cache.RunCache(tracker.uri, exp.experiment_id, exp.creation_time).folder


def fast_digest(uri: str, study: str, n_boot: int, seed: int, since_ms: int) -> tuple[str, str] | None:
    """``(experiment id, digest)`` of a report's inputs read from an sqlite store without MLflow
    (:mod:`~orchestrator.analysis.sqlite_state`); None where that module cannot tell."""
    got = sqlite_state.state_of(uri, study, since_ms, run_cache.SETTLE_MS)
    if got is None:
        return None
    eid, state = got
    doc = {"version": VERSION, "code": code_digest(), "tracking_uri": uri, "study": study}
    doc.update({"n_boot": n_boot, "seed": seed, "sqlite_state": state})
    return eid, hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def kept_report_fast(uri: str, study: str, n_boot: int, seed: int) -> KeptReport | None:
    """:func:`kept_report` for an sqlite store, asked with sqlite3 instead of MLflow (``uri``: as
    :func:`sqlite_state.tracking_uri` resolves it); None when not kept, changed, or not knowable
    this way — the caller then asks through MLflow."""
    path = sqlite_state.db_path(uri)
    if path is None:
        return None
    try:
        with contextlib.closing(sqlite_state.connect(path)) as db:
            eid = sqlite_state.experiment(db, study)
            created = sqlite_state.created_ms(db, eid) if eid is not None else None
    except sqlite3.Error:
        return None
    kept = _load(run_cache.RunCache(uri, eid, created).folder) if eid is not None else None
    if kept is None or kept.fast_digest is None:
        return None
    got = fast_digest(uri, study, n_boot, seed, kept.since_ms)
    return kept if got is not None and got == (eid, kept.fast_digest) else None


def inputs_digest(tracker: Tracker, study: str, n_boot: int, seed: int, since_ms: int, exp=None) -> str | None:
    """The digest of everything a report of ``study`` (its MLflow experiment ``exp``, looked up
    if not given) is computed from (module docstring), runs ended since ``since_ms`` counted as
    new; None when a report must be computed anyway (a run in flight, no such study)."""
    exp = exp or _experiment(tracker.client, study)
    state = _study_state(tracker.client, exp, since_ms) if exp is not None else None
    if state is None:
        return None
    doc = {
        "version": VERSION,
        "code": code_digest(),
        "tracking_uri": tracker.uri,
        "study": study,
        "n_boot": n_boot,
        "seed": seed,
        "state": state,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _load(folder: Path) -> KeptReport | None:
    try:
        doc = json.loads((folder / "kept-report.json").read_text())
        if doc.pop("version", None) != VERSION:
            return None
        return KeptReport(folder=folder, **doc)
    except (OSError, ValueError, TypeError):
        return None  # none kept, or unreadable: the report is computed and kept anew


def kept_report(tracker: Tracker, study: str, n_boot: int, seed: int) -> KeptReport | None:
    """The report kept for ``study``, if nothing it was computed from changed since; else None."""
    exp = _experiment(tracker.client, study)
    kept = _load(_folder(tracker, exp)) if exp is not None else None
    if kept is None or inputs_digest(tracker, study, n_boot, seed, kept.since_ms, exp) != kept.digest:
        return None
    return kept


def restore(kept: KeptReport, out_dir: str | Path) -> Path | None:
    """Make ``out_dir`` hold the kept report (files already equal are left alone); its HTML path,
    or None when a kept file is missing or altered (the report must then be computed)."""
    out = Path(out_dir)
    for rel, sha in kept.files.items():
        dst = out / rel
        if dst.is_file() and _sha(dst) == sha:
            continue
        src = kept.files_dir / rel
        if not src.is_file() or _sha(src) != sha:
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return out / "report.html"


def numbers_text(kept: KeptReport) -> str:
    """The kept ``numbers.json``: what ``transferlab report --json`` prints."""
    return (kept.files_dir / "numbers.json").read_text()


def begin(tracker: Tracker, study: str, n_boot: int, seed: int) -> tuple[str, int, str | None] | None:
    """Before computing a report: the digest of its inputs, the time it was taken and the same
    digest read without MLflow (None unless an sqlite store), to :func:`keep` afterwards; None
    when the report will not be kept (a run in flight)."""
    since_ms = int(time.time() * 1000)
    digest = inputs_digest(tracker, study, n_boot, seed, since_ms)
    if digest is None:
        return None
    fast = fast_digest(tracker.uri, study, n_boot, seed, since_ms)
    return digest, since_ms, None if fast is None else fast[1]


def keep(
    tracker: Tracker,
    study: str,
    started: tuple[str, int, str | None],
    out_dir: str | Path,
    written: list[str],
    summary: dict,
) -> None:
    """Keep the report just written to ``out_dir`` (the files ``written``, relative to it) with
    the digest :func:`begin` took. ``summary``: study_run_id, status_line, partial, figures,
    tables, logged_on."""
    exp = _experiment(tracker.client, study)
    if exp is None:
        return
    folder = _folder(tracker, exp)
    out = Path(out_dir)
    files = {rel: out / rel for rel in written}
    digest, since_ms, fast = started
    kept = KeptReport(
        folder, digest, since_ms, files={rel: _sha(p) for rel, p in files.items()}, fast_digest=fast, **summary
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".kept-report-", dir=folder))
    for rel, p in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, tmp / rel)
    shutil.rmtree(kept.files_dir, ignore_errors=True)
    os.replace(tmp, kept.files_dir)
    _save(kept)


def mark_logged(kept: KeptReport, run_id: str) -> None:
    """Record that the kept report was logged on study run ``run_id``."""
    kept.logged_on = run_id
    _save(kept)


def _save(kept: KeptReport) -> None:
    doc = {"version": VERSION, **asdict(kept)}
    doc.pop("folder")
    tmp = kept.folder / f".kept-report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, kept.folder / "kept-report.json")
