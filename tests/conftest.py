"""Shared fixtures: one real local Ray for the whole session, a private builtin-data cache."""

import os
import tempfile

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
# Builtin datasets are converted once per test session, into a directory nobody else uses.
os.environ.setdefault("TRANSFERLAB_CACHE", tempfile.mkdtemp(prefix="transferlab-test-cache-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from orchestrator.cluster import WORKER_ENV

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
