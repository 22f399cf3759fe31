"""A durable buffer for metrics the tracking server could not take.

When a training report cannot reach MLflow, its metrics are written as one small JSON file under
``STORAGE/_tracking_spool/STORE/EXPERIMENT/`` (local or object store, wherever checkpoints go)
and training goes on. The spool is sent on — each (run, metric, step) once — by the next report
that reaches the server, by the pretraining trial before it marks its run finished, and by the
driver at the start and end of every ``transferlab run``. So a metric survives a server outage,
a crashed Train controller and a stopped study alike.

Guarantees:

- **Scoped.** ``STORE`` is a digest of the tracking URI (credentials left out) and
  ``EXPERIMENT`` the study's experiment id (:func:`scope`): studies sharing a storage path but not
  a tracking store or experiment never read, send or delete each other's batches. A batch is
  deleted once sent, or when its run refuses writes (deleted in MLflow); never because its run
  is not found — that batch is kept for the store it belongs to. Batches of the layout before
  scoping (directly in ``_tracking_spool/``) are sent only to a store that holds their run in
  the same experiment, and otherwise left alone.
- **Durable.** A batch on a local disk is fsynced, renamed into place and its folder fsynced, so
  a power loss leaves a whole batch or none; on an object store a PUT is whole or absent.
- **A corrupt batch blocks nothing.** It is moved aside to ``_tracking_spool/_quarantine/``
  with one warning, and the rest is sent.
"""

from __future__ import annotations

import json
import os
import sys
import uuid

from mlflow.entities import Metric

from datasets_.objstore import filesystem, is_remote, write_atomic
from orchestrator.records.retry import TrackingUnavailable, is_transient, redact, store_key
from orchestrator.records.tracker import logged_steps

SPOOL_DIR = "_tracking_spool"
QUARANTINE_DIR = "_quarantine"


def scope(tracking_uri: str, experiment_id: str) -> str:
    """The spool folder of one study's batches: ``STORE/EXPERIMENT``, STORE a digest of the
    tracking URI without credentials (driver and workers name one store alike)."""
    return f"{store_key(tracking_uri)}/{experiment_id}"


def _root(storage: str) -> tuple[object, str]:
    fs, base = filesystem(storage)
    return fs, f"{base.rstrip('/')}/{SPOOL_DIR}"


def _write_durable(path: str, body: bytes) -> None:
    """``body`` into the local file ``path``: written aside, fsynced, renamed, folder fsynced."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(storage: str, where: str, run_id: str, metrics: list[Metric]) -> None:
    """Store ``metrics`` of ``run_id`` durably, in spool folder ``where`` (:func:`scope`), until
    :func:`flush` sends them."""
    if not metrics:
        return
    body = json.dumps({"run_id": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]}).encode()
    name = f"{SPOOL_DIR}/{where}/{run_id}.{uuid.uuid4().hex}.json"
    # Readers never see half a file; ".tmp" files are not batches (pending() lists *.json).
    if is_remote(storage):
        write_atomic(f"{storage.rstrip('/')}/{name}", lambda f: f.write(body))
    else:
        _write_durable(os.path.join(filesystem(storage)[1], name), body)


def _listed(fs, folder: str, run_id: str | None) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json"))
    return [p for p in names if run_id is None or p.rsplit("/", 1)[-1].startswith(f"{run_id}.")]


def pending(storage: str, where: str, run_id: str | None = None) -> list[str]:
    """Paths of the spooled batches in folder ``where`` (of one run, or all)."""
    fs, root = _root(storage)
    return _listed(fs, f"{root}/{where}", run_id)


def _quarantine(fs, root: str, path: str, why: str) -> None:
    fs.create_dir(f"{root}/{QUARANTINE_DIR}", recursive=True)
    aside = f"{root}/{QUARANTINE_DIR}/{path.rsplit('/', 1)[-1]}"
    fs.move(path, aside)
    print(f"warning: spool file {path} is unreadable ({why}); moved aside to {aside}", file=sys.stderr)


def _read(fs, root: str, path: str) -> tuple[str, list[Metric]] | None:
    """A batch's run id and metrics; None (and the file quarantined) if it is corrupt."""
    try:
        with fs.open_input_stream(path) as f:
            body = json.loads(f.read())
        return str(body["run_id"]), [Metric(k, float(v), int(t), int(s)) for k, v, t, s in body["metrics"]]
    except (ValueError, KeyError, TypeError) as e:
        _quarantine(fs, root, path, type(e).__name__)
        return None


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def flush(storage: str, where: str, client, run_id: str | None = None) -> int:
    """Send the batches of spool folder ``where`` (of one run, or all) that MLflow lacks;
    delete each batch once sent. Returns the number of metric values sent.

    ``client`` is an MlflowClient of the store ``where`` belongs to; connection errors propagate
    (the caller decides whether to retry).
    """
    fs, root = _root(storage)
    experiment_id = where.rsplit("/", 1)[-1]
    sent = 0
    legacy = _listed(fs, root, run_id)  # batches written before spools were scoped
    for path in pending(storage, where, run_id) + legacy:
        batch = _read(fs, root, path)
        if batch is None:
            continue
        rid, metrics = batch
        try:
            if path in legacy and client.get_run(rid).info.experiment_id != experiment_id:
                continue  # another study's batch: not ours to send or delete
            seen = logged_steps(client, rid, {m.key for m in metrics})
            new = [m for m in metrics if (m.key, m.step) not in seen]
            if new:
                client.log_batch(rid, metrics=new)
                sent += len(new)
        except Exception as e:
            if isinstance(e, TrackingUnavailable) or is_transient(e):
                raise
            if _not_found(e):
                if path not in legacy:
                    print(f"warning: run {rid} of spooled metrics is not in this tracking store; kept {path}",
                          file=sys.stderr)  # fmt: skip
                continue
            # The run is deleted in MLflow or refuses writes: nothing left to send it to.
            print(
                f"warning: dropped {len(metrics)} spooled metric value(s) of run {rid}: "
                f"{redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]}",
                file=sys.stderr,
            )
        fs.delete_file(path)
    return sent
