"""Shared fixtures: one real local Ray for the whole session, a private builtin-data cache."""

import os
import tempfile

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
# Builtin datasets are converted once per test session, into a directory nobody else uses.
os.environ.setdefault("TRANSFERLAB_CACHE", tempfile.mkdtemp(prefix="transferlab-test-cache-"))

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback, for the whole session.

    Its endpoint and test credentials are exported before Ray starts, so Ray's workers read
    s3:// URIs from it exactly as they would from a real object store.
    """
    # The project's own moto first: another moto_server on PATH (e.g. moto 5.2.1 from a pyenv
    # shim) fails pyarrow's multipart uploads, so Ray Train checkpoints to s3:// would fail.
    server = str(Path(sys.executable).parent / "moto_server")
    if not Path(server).exists():
        server = shutil.which("moto_server") or server
    if not Path(server).exists():
        pytest.skip("moto_server is not installed (pip install -e '.[test]')")
    port = _free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
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
