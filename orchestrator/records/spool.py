"""A durable buffer for metrics the tracking server could not take.

When a training report cannot reach MLflow, its metrics are written as one small JSON file under
``STORAGE/_tracking_spool/`` (local or object store, wherever checkpoints go) and training goes
on. The spool is sent on — each (run, metric, step) once — by the next report that reaches the
server, by the pretraining trial before it marks its run finished, and by the driver at the start
and end of every ``transferlab run``. So a metric survives a server outage, a crashed Train
controller and a stopped study alike.
"""

from __future__ import annotations

import json
import sys
import uuid

from mlflow.entities import Metric

from datasets_.objstore import filesystem, write_atomic
from orchestrator.records.retry import TrackingUnavailable, is_transient, redact
from orchestrator.records.tracker import logged_steps

SPOOL_DIR = "_tracking_spool"


def _fs(storage: str):
    fs, base = filesystem(storage)
    return fs, f"{base.rstrip('/')}/{SPOOL_DIR}"


def write(storage: str, run_id: str, metrics: list[Metric]) -> None:
    """Store ``metrics`` of ``run_id`` durably until :func:`flush` sends them."""
    if not metrics:
        return
    body = json.dumps({"run_id": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]}).encode()
    # Readers never see half a file; ".tmp" files are not batches (pending() lists *.json).
    write_atomic(f"{storage.rstrip('/')}/{SPOOL_DIR}/{run_id}.{uuid.uuid4().hex}.json", lambda f: f.write(body))


def pending(storage: str, run_id: str | None = None) -> list[str]:
    """Paths of spooled batches (of one run, or all)."""
    import pyarrow.fs as pafs

    fs, d = _fs(storage)
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json"))
    return [p for p in names if run_id is None or p.rsplit("/", 1)[-1].startswith(f"{run_id}.")]


def flush(storage: str, client, run_id: str | None = None) -> int:
    """Send spooled metrics (of one run, or all) that MLflow lacks; delete each batch once sent.

    Returns the number of metric values sent. ``client`` is an MlflowClient; connection errors
    propagate (the caller decides whether to retry).
    """
    fs, _ = _fs(storage)
    sent = 0
    for path in pending(storage, run_id):
        with fs.open_input_stream(path) as f:
            body = json.loads(f.read())
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in body["metrics"]]
        try:
            seen = logged_steps(client, body["run_id"], {m.key for m in metrics})
            new = [m for m in metrics if (m.key, m.step) not in seen]
            if new:
                client.log_batch(body["run_id"], metrics=new)
                sent += len(new)
        except Exception as e:
            if isinstance(e, TrackingUnavailable) or is_transient(e):
                raise
            # The run is gone (deleted in MLflow) or refuses writes: nothing left to send it to.
            print(
                f"warning: dropped {len(metrics)} spooled metric value(s) of run {body['run_id']}: "
                f"{redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]}",
                file=sys.stderr,
            )
        fs.delete_file(path)
    return sent
