"""Connecting to Ray: a private in-process cluster by default, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os

from orchestrator.records.retry import MLFLOW_HTTP_ENV
from orchestrator.spec import SpecError

# Environment every Ray worker of a study gets: no MLflow telemetry (machines may have no
# internet), no Ray Data progress bars interleaved with our progress lines.
WORKER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Tune's own console reporter (experiment banners, trial tables) off: we print progress lines.
    "RAY_AIR_NEW_OUTPUT": "0",
    # MLflow's HTTP client retries briefly; orchestrator.records.retry rides out longer outages.
    **MLFLOW_HTTP_ENV,
}


def quiet_ray_logs() -> None:
    """Keep the console to transferlab's own progress lines (Ray's logs stay in its log dir)."""
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, verbose: bool = False):
    """Connect to Ray for the duration of the block; yield True if the runtime is private
    (started here, and so holding only this machine's resources).

    - Ray already initialized in this process (tests, notebooks): use it, leave it running.
    - ``address`` (or ``RAY_ADDRESS``) given: join that cluster (``auto`` = one started with
      ``ray start --head`` on this machine).
    - Otherwise: start a private local Ray for this process and shut it down afterwards. Its
      logical CPU count defaults to twice the cores: a pretraining trial spends much of its life
      starting actors and waiting on ingest, so two trials per core pair keep the cores busy
      (each training worker still runs torch with ``cpus_per_worker`` threads).

    With ``verbose`` the trials' own output and errors reach this process's output, each line
    prefixed with the process and node it came from (Ray's ``log_to_driver``).
    """
    import ray

    os.environ.update(WORKER_ENV)
    quiet_ray_logs()
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose)
        except (ConnectionError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError("--address", f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or 2 * (os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=verbose,
        )
    try:
        yield not address
    finally:
        ray.shutdown()
