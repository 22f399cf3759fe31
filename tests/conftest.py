"""Shared fixtures: one real local Ray for the whole session, a private builtin-data cache seeded from
the conversions kept in .pytest_cache."""

import os
import tempfile

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
# Ray Train's controller polls its workers every 2 s (default), and a worker's report waits in a
# one-slot queue until the next poll: with the tests' sub-second epochs that paces every epoch and
# the end of every TorchTrainer at 2 s. A shorter cadence (set before any Ray starts, so the
# session Ray and the tests' subprocess drivers and `ray start` clusters inherit it) changes no
# behaviour; a poll that is not answered in time is awaited in the next one, not an error.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Each session has a cache directory nobody else uses; its builtin conversions are seeded from, and
# kept in, .pytest_cache between runs (see pytest_configure).
os.environ.setdefault("TRANSFERLAB_CACHE", tempfile.mkdtemp(prefix="transferlab-test-cache-"))

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _builtin_cache_key() -> str:
    """Changes whenever a builtin's conversion could: the converting code, the packages whose data
    or rendering it converts, and the shard writer."""
    import hashlib
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent / "datasets_"
    digest = hashlib.sha256()
    for name in ("builtin.py", "glyphs.py", "shapes.py", "shards.py", "views.py"):
        digest.update((root / name).read_bytes())
    for package in ("scikit-learn", "mlxtend", "matplotlib", "pillow", "numpy", "pyarrow"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()[:16]


def _copy_tree_linked(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` by hard links (shards are written once, never in place), falling
    back to a plain copy across file systems; atomic: ``dst`` appears whole or not at all."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    try:
        os.replace(tmp, dst)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)


def pytest_configure(config):
    """Converting the builtin datasets takes about a minute; their shards are a pure function of
    _builtin_cache_key, so conversions are kept between runs in the pytest cache and linked into
    this session's private cache before any test or Ray worker opens them."""
    if getattr(config, "cache", None) is None:  # -p no:cacheprovider
        return
    kept = config.cache.mkdir("transferlab-builtin") / _builtin_cache_key()
    session = Path(os.environ["TRANSFERLAB_CACHE"]) / "builtin"
    config.stash[_KEPT_BUILTINS] = (kept, session)
    if kept.is_dir():
        session.mkdir(parents=True, exist_ok=True)
        for ds in kept.iterdir():
            if (ds / "manifest.json").is_file() and not (session / ds.name).exists():
                _copy_tree_linked(ds, session / ds.name)


def pytest_unconfigure(config):
    """Keep what this session converted; drop conversions of older code or packages."""
    kept, session = config.stash.get(_KEPT_BUILTINS, (None, None))
    if kept is None or not session.is_dir():
        return
    for ds in session.iterdir():
        if (ds / "manifest.json").is_file() and not (kept / ds.name).exists():
            kept.mkdir(parents=True, exist_ok=True)
            _copy_tree_linked(ds, kept / ds.name)
    for stale in kept.parent.iterdir():
        if stale != kept:
            shutil.rmtree(stale, ignore_errors=True)


_KEPT_BUILTINS = pytest.StashKey[tuple]()

# With two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`, pyproject's
# addopts) each file runs whole on one worker (its module fixtures, a namespaced cluster or a
# study, are made once), and the slowest files are handed out first, longest first, so the two
# workers end together (6 Dec 2026: 1,128 s wall for 2,222 s of test phases). Seconds: each
# file's test phases in that run; most of them wait on subprocess drivers, clusters and servers.
SLOWEST_FILES = (
    "test_multinode.py",  # ≈ 520: a 2-node cluster in namespaces, chaos (server, disk, worker kills)
    "test_methods_study.py",  # ≈ 300: every method and protocol; two workers and a killed one
    "test_resume_kill.py",  # ≈ 210: a SIGKILLed driver and its resume
    "test_outages.py",  # ≈ 150: a tracking server killed and restarted mid-study
    "test_mlflow_server.py",  # ≈ 135: a study against a live MLflow server and PostgreSQL
    "test_examples.py",  # ≈ 115: the three paper studies at --quick size
    "test_budget.py",  # ≈ 95
    "test_study.py",  # ≈ 75: the end-to-end study, a TorchTrainer run, the MLflow UI in a browser
    "test_submit.py",  # ≈ 75: a `ray start` cluster and submitted jobs
    "test_rerun_changed.py",
    "test_raw_sources.py",
    "test_finetune_search.py",
    "test_report_kept.py",
    "test_datamodels.py",
    "test_packed_study.py",
    "test_s3.py",
    "test_packed.py",
    "test_record_repair.py",
)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker: the files of :data:`SLOWEST_FILES` first, in that order (the scheduler
    hands files out in collection order); a serial run keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    from orchestrator.execution.ray_connection import WORKER_ENV

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


class MlflowServer:
    """A real ``mlflow server`` process (sqlite backend, local proxied artifacts) that a test can
    kill and start again on the same port and store, as an outage does."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "mlflow.db"
        self.proc = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        import signal  # noqa: F401  (used by kill)

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer /health within {timeout}s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole server process group: no graceful shutdown, as in a crash."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-2000:] if logs else ""


@pytest.fixture(scope="module")
def mlflow_server_process(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.kill()
