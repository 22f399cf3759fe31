"""A local cache of a study's MLflow runs and of the artifacts the report reads from them.

``transferlab report`` on a large study spends its time asking MLflow for every run and reading
hundreds of small artifacts. Both are kept under ``$TRANSFERLAB_CACHE/report/`` (default
``~/.cache/transferlab``), one folder per (tracking store, experiment id, the experiment's
creation time), so two stores never mix, nor a store replaced by a new one at the same address
(its experiments are created anew); a rerun asks MLflow only for what may have changed:

- runs that ended since the last read, less :data:`SETTLE_MS` (``attributes.end_time >= …``):
  new runs, and runs resumed and finished again (a finish stamps a new end time);
- runs not FINISHED (``attributes.status != 'FINISHED'``): a running run's status and metrics
  still move, so it is read every time (failed and killed ones too: they are few);
- the experiment's deleted runs, which leave the cache; a run that leaves the deleted list
  again (restored, or purged by ``mlflow gc``) is looked up by id.

:data:`SETTLE_MS` covers writers whose clocks run behind this one's and a finish stamped a
moment before it is committed. What the cache does not see: a value logged onto a run that had
already ended more than :data:`SETTLE_MS` before the last report (no end time moves); run
``transferlab report --refresh`` after such a repair. Artifacts are cached per run and end time,
so a run that finishes again has its class mask and per-example outputs read anew.

Files are JSON and Parquet (nothing executable), each written to a temporary name and renamed
into place. A cache that cannot be read is discarded with one warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from datasets_.objstore import cache_dir
from orchestrator.records.retry import redact
from orchestrator.records.schema import KIND_STUDY, TAG_KIND

if TYPE_CHECKING:
    import pandas as pd

# numpy and pandas are imported where the artifact tables are read: a report served whole
# (report_cache) needs this module's keys and searches, not them.

SETTLE_MS = 120_000  # runs that ended this close before the last read are read again
VERSION = 1
_PAGE = 1000


def run_to_dict(run) -> dict:
    """The parts of an MLflow ``Run`` the analysis reads, as plain JSON-safe data."""
    i = run.info
    return {
        "info": {
            "run_id": i.run_id,
            "run_name": i.run_name,
            "status": i.status,
            "start_time": i.start_time,
            "end_time": i.end_time,
            "artifact_uri": i.artifact_uri,
            "lifecycle_stage": i.lifecycle_stage,
        },
        "data": {"params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)},
    }


def run_from_dict(d: dict) -> SimpleNamespace:
    """A run read back from the cache, with the ``info`` and ``data`` attributes of an MLflow ``Run``."""
    return SimpleNamespace(info=SimpleNamespace(**d["info"]), data=SimpleNamespace(**d["data"]))


def store_key(tracking_uri: str, experiment_id: str, created_ms: int | None) -> str:
    """The cache folder name of one experiment in one tracking store: with its creation time, as
    a database deleted and made again at the same path reuses the experiment ids."""
    return hashlib.sha256(f"{tracking_uri}\n{experiment_id}\n{created_ms}".encode()).hexdigest()[:24]


def _warn(what: Path, e: Exception) -> None:
    print(f"warning: report cache {what} is unreadable ({type(e).__name__}); rebuilding it", file=sys.stderr)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunCache:
    """The cached runs of one experiment of one tracking store (see the module docstring).

    ``created_ms``: the experiment's ``creation_time``; ``folder`` defaults to
    ``$TRANSFERLAB_CACHE/report/KEY``; ``refresh`` ignores what is cached and reads every run again."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        created_ms: int | None,
        folder: str | Path | None = None,
        refresh: bool = False,
    ):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.folder = Path(folder or cache_dir() / "report" / store_key(tracking_uri, experiment_id, created_ms))
        self.refresh = refresh
        self.current: dict[str, int | None] | None = None  # run id -> end time, once runs() has read them
        self.runs_read = self.artifacts_read = 0  # how many came from MLflow rather than the cache

    # -- runs ---------------------------------------------------------------------------------

    def _load_runs(self) -> dict | None:
        path = self.folder / "runs.json"
        if self.refresh or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != VERSION or doc.get("tracking_uri") != self.tracking_uri:
                return None
            if doc.get("experiment_id") != self.experiment_id:
                return None
            if not isinstance(doc["runs"], dict) or not isinstance(doc["settled_ms"], int):
                raise ValueError("runs.json lacks its runs or its time")
            return doc
        except Exception as e:
            _warn(path, e)
            return None

    def runs(self, client) -> list:
        """Every active run of the experiment, reading from ``client`` (an ``MlflowClient``)
        only what may have changed since the cache was written; the cache is updated."""
        from mlflow.entities import ViewType

        started_ms = int(time.time() * 1000)
        doc = self._load_runs()
        exp = self.experiment_id
        if doc is None:
            runs, was_deleted = {}, set()
            fresh = search_all(client, exp, "")
        else:
            runs, was_deleted = doc["runs"], set(doc.get("deleted", []))
            fresh = search_all(client, exp, f"attributes.end_time >= {doc['settled_ms'] - SETTLE_MS}")
            fresh += search_all(client, exp, "attributes.status != 'FINISHED'")
            fresh += search_all(client, exp, f"tags.`{TAG_KIND}` = '{KIND_STUDY}'")
        deleted = {r.info.run_id for r in search_all(client, exp, "", ViewType.DELETED_ONLY)}
        for rid in was_deleted - deleted:  # no longer deleted: restored (read it), or purged
            fresh += [r for r in [_get_run(client, rid)] if r is not None and r.info.lifecycle_stage == "active"]
        runs.update({r.info.run_id: run_to_dict(r) for r in fresh})
        for rid in deleted:
            runs.pop(rid, None)
        gone = sorted(deleted)
        self.runs_read += len(fresh)
        self.folder.mkdir(parents=True, exist_ok=True)
        out = {
            "version": VERSION,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "settled_ms": started_ms,
            "deleted": gone,
            "runs": runs,
        }
        _write_atomic(self.folder / "runs.json", lambda p: p.write_text(json.dumps(out)))
        self.current = {rid: d["info"]["end_time"] for rid, d in runs.items()}
        # MLflow's own order (newest start first, then run id): what reads the runs sees no difference
        order = sorted(runs.values(), key=lambda d: (-(d["info"]["start_time"] or 0), d["info"]["run_id"]))
        return [run_from_dict(d) for d in order]

    # -- artifacts ----------------------------------------------------------------------------

    def _artifact_files(self, name: str) -> tuple[Path, Path]:
        stem = f"artifact-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        return self.folder / f"{stem}.parquet", self.folder / f"{stem}.absent.json"

    def _load_artifacts(self, name: str) -> tuple[pd.DataFrame, set]:
        table_path, absent_path = self._artifact_files(name)
        import pandas as pd

        empty = pd.DataFrame(columns=["_run_id", "_end_time"])
        if self.refresh:
            return empty, set()
        try:
            table = pd.read_parquet(table_path) if table_path.exists() else empty
            if not {"_run_id", "_end_time"} <= set(table.columns):
                raise ValueError("missing key columns")
            absent = {(r, int(e)) for r, e in json.loads(absent_path.read_text())} if absent_path.exists() else set()
            return table, absent
        except Exception as e:
            _warn(table_path, e)
            return empty, set()

    def artifacts(self, name: str, keys: list[tuple[str, int | None]], fetch) -> pd.DataFrame:
        """The rows of each run's artifact as one table, column ``_i`` the run's position in
        ``keys`` (``(run_id, end_time)`` each): cached runs read back, the others from
        ``fetch(indices) -> values`` (a DataFrame each, None where the run has no such artifact)
        and cached. ``name`` names the artifact and what was read from it. Runs not yet ended
        (end time None) are always fetched and never cached."""
        import numpy as np
        import pandas as pd

        table, absent = self._load_artifacts(name)
        table["_end_time"] = table["_end_time"].astype("Int64")
        want = pd.DataFrame(
            {
                "_run_id": pd.Series([k[0] for k in keys], dtype=object),
                "_end_time": pd.array([k[1] for k in keys], dtype="Int64"),
                "_i": np.arange(len(keys)),
            }
        )
        hit = table.merge(want, on=["_run_id", "_end_time"]) if len(table) else table.assign(_i=[])
        have = set(hit["_i"].tolist())
        missing = [i for i, k in enumerate(keys) if i not in have and k not in absent]
        fetched = fetch(missing) if missing else []
        self.artifacts_read += len(missing)
        new = {i: v for i, v in zip(missing, fetched) if v is not None}
        out = pd.concat(
            [hit.drop(columns=["_run_id", "_end_time"]), *[v.assign(_i=i) for i, v in new.items()]], ignore_index=True
        )
        if missing:
            self._store(name, table, absent, keys, missing, new)
        return out

    def _store(self, name: str, table: pd.DataFrame, absent: set, keys: list, missing: list, new: dict) -> None:
        """Write the artifact table back: rows of runs deleted or finished again since leave,
        the newly fetched ones join; runs not yet ended never enter."""

        import pandas as pd

        def wanted(k) -> bool:
            return k[1] is not None and (self.current is None or self.current.get(k[0], -1) == k[1])

        if self.current is not None and len(table):
            now = table["_run_id"].map(self.current).astype("Int64")
            table = table[(now == table["_end_time"]).fillna(False).to_numpy(bool)]
        added = [v.assign(_run_id=keys[i][0], _end_time=keys[i][1]) for i, v in new.items() if wanted(keys[i])]
        merged = pd.concat([table, *added], ignore_index=True) if added else table
        absent = {k for k in absent if wanted(k)} | {keys[i] for i in missing if i not in new and wanted(keys[i])}
        table_path, absent_path = self._artifact_files(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(table_path, lambda p: merged.to_parquet(p, index=False))
        _write_atomic(absent_path, lambda p: p.write_text(json.dumps(sorted(absent))))


def search_all(client, experiment_id: str, flt: str, view_type=None) -> list:
    from mlflow.entities import ViewType

    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=flt, run_view_type=view_type or ViewType.ACTIVE_ONLY,
            max_results=_PAGE, page_token=token,
        )  # fmt: skip
        out.extend(page)
        token = page.token
        if not token:
            return out


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RuntimeError(f"cannot read run {run_id}: {redact(str(e))[:200]}") from None
