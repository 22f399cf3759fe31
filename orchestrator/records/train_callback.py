"""The Ray Train callback that turns training reports into MLflow metrics (driver side)."""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator.records import retry, spool
from orchestrator.records.credentials import apply_mlflow_client_env
from orchestrator.records.schema import METRIC_TRAIN_LOSS_STEP
from orchestrator.records.tracker import logged_steps
from trainers.protocols import STEP_LOSSES

try:
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - ray is a hard dependency; keeps this module importable
    UserCallback = object


def epoch_metrics_to_mlflow(report: dict, timestamp_ms: int | None = None) -> list[Metric]:
    """The MLflow metrics of one epoch report of a pretraining loop: every number in it at
    ``step = report["epoch"]`` (booleans and other values left out), and each
    ``[global step, loss]`` pair of its :data:`~trainers.protocols.STEP_LOSSES` list as
    ``train_loss_step`` at that step. All share ``timestamp_ms`` (default: now), so a batch sent
    again is the same batch. Any trainer's reports read this way (the Train callback's, a
    packed trial's own)."""
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    epoch = int(report.get("epoch", 0))
    out = [
        Metric(k, float(v), now, epoch)
        for k, v in report.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    out += [Metric(METRIC_TRAIN_LOSS_STEP, float(loss), now, int(step)) for step, loss in report.get(STEP_LOSSES, ())]
    return out


class MLflowReportCallback(UserCallback):
    """Turns every ``ray.train.report`` of rank 0 into MLflow metrics of a driver-created run.

    Runs on the Ray Train controller, so training loops stay MLflow-agnostic. Metrics are logged
    as :func:`epoch_metrics_to_mlflow` reads them (``step = metrics["epoch"]``, step losses at
    their optimizer step); steps already present (a resumed run) are not logged again.
    ``mlflow_env`` carries the driver's MLflow credentials (``orchestrator.records.credentials.MLFLOW_CLIENT_ENV``)
    into the controller's process.

    While the tracking server is down, reports go to a durable spool in the study's storage
    (:mod:`orchestrator.records.spool`) and training goes on; the next report that reaches the server, the
    trial before it finishes the run, or the next ``transferlab run`` sends them, once each.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        mlflow_env: dict[str, str] | None = None,
        spool_storage: str | None = None,
        experiment_id: str | None = None,
    ):
        self.tracking_uri, self.run_id, self.spool_storage = tracking_uri, run_id, spool_storage
        # The run's own spool folder (its store and experiment); needed with spool_storage.
        self.spool_scope = spool.scope(tracking_uri, experiment_id) if spool_storage else None
        self._mlflow_env = dict(mlflow_env or {})
        self._client = None
        self._seen: set[tuple[str, int]] = set()
        self._known: set[str] = set()  # metric keys whose history in MLflow has been read
        self._pending: list[Metric] = []
        self._spooled = False

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        step = int(metrics[0].get("epoch", 0))
        self._pending.extend(epoch_metrics_to_mlflow(metrics[0]))
        try:
            self._flush()
        except Exception as e:
            if not retry.is_transient(e) or self.spool_storage is None:
                raise
            spool.write(self.spool_storage, self.spool_scope, self.run_id, self._pending)
            self._spooled = True
            print(
                f"warning: tracking server {retry.redact(self.tracking_uri)} unreachable; {len(self._pending)} "
                f"metric value(s) of step {step} kept in the storage spool until it is back",
                flush=True,
            )
            self._pending = []

    def _flush(self) -> None:
        if self._client is None:
            apply_mlflow_client_env(self._mlflow_env)
            self._client = MlflowClient(self.tracking_uri)
        unknown = {m.key for m in self._pending} - self._known
        if unknown:
            self._seen |= logged_steps(self._client, self.run_id, unknown)
            self._known |= unknown
        new = [m for m in self._pending if (m.key, m.step) not in self._seen]
        if new:
            self._client.log_batch(self.run_id, metrics=new)
            self._seen.update((m.key, m.step) for m in new)
        self._pending.clear()
        if self._spooled:  # the server is back: send what earlier reports left in the spool
            spool.flush(self.spool_storage, self.spool_scope, self._client, self.run_id)
            self._spooled = False
