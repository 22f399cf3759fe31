"""MLflow's system metrics (``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``,
disk, network, and GPU utilization and memory where a GPU is visible) on pretraining runs while
they train.

:func:`system_metrics` samples the machine of the process that calls it — the pretraining trial,
which on one node shares the machine with its TorchTrainer workers; the packed trial, which
trains its runs itself — every :data:`SAMPLING_INTERVAL_S` seconds and logs the mean of each
:data:`SAMPLES_PER_POINT` samples as one point (step 0, 1, ...; a resumed run goes on from its
last step), plus a last point when training ends, so even a run shorter than one period has one.
A packed trial's samples go to every run of its pack: the runs shared the process.
MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` and
``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` override both; ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``
turns them off.

Best effort: a sample that cannot be logged (the tracking server is down) ends the sampling with
a warning; training and its own records never wait for it.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

SAMPLING_INTERVAL_S = 1.0
SAMPLES_PER_POINT = 10
PREFIX = "system/"


def _monitor(run_ids: list[str], tracking_uri: str):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.utils.autologging_utils import BatchMetricsLogger

    # Its INFO lines ("Started monitoring...", "Skip logging GPU metrics") would start every trial's log.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

    class Monitor(SystemMetricsMonitor):
        """MLflow's monitor, logging each point to every run of ``run_ids`` and a last point at
        :meth:`finish`."""

        def __init__(self):
            super().__init__(
                run_ids[0],
                sampling_interval=SAMPLING_INTERVAL_S,
                samples_before_logging=SAMPLES_PER_POINT,
                resume_logging=True,
                tracking_uri=tracking_uri,
            )
            self.loggers = [self.mlflow_logger] + [
                BatchMetricsLogger(r, tracking_uri=tracking_uri) for r in run_ids[1:]
            ]

        def publish_metrics(self, metrics):
            named = {PREFIX + k: v for k, v in metrics.items()}
            for logger in self.loggers:
                logger.record_metrics(named, self._logging_step)
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

        def finish(self):
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            self.collect_metrics()
            self.publish_metrics(self.aggregate_metrics())
            for logger in self.loggers:
                logger.flush()

    return Monitor()


def _warn(what: str, e: Exception) -> None:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"warning: system metrics {what}: {first[:200]}", file=sys.stderr, flush=True)


@contextmanager
def system_metrics(run_ids: list[str], tracking_uri: str):
    """Sample this machine into the MLflow runs ``run_ids`` (RUNNING, in store ``tracking_uri``)
    while the ``with`` block runs; the block's own errors pass through untouched."""
    monitor = None
    if run_ids and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in ("false", "0"):
        try:
            monitor = _monitor(list(run_ids), tracking_uri)
            monitor.start()
        except Exception as e:
            _warn("not sampled", e)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:
                _warn("of the last period not logged", e)
