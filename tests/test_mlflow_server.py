"""The production tracking stack, live on loopback.

A real PostgreSQL (the distribution's binaries, a throwaway cluster), a real ``mlflow server``
started through ``deploy/mlflow/entrypoint.sh`` — the image's entrypoint — with basic auth, host
validation and artifacts proxied to S3-compatible storage (moto's server), then a tiny study run
through ``transferlab run --tracking-uri http://127.0.0.1:PORT`` with credentials from the
environment, and every run and artifact read back through the server.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.records.schema import (
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    TAG_CHECKPOINT,
    TAG_KIND,
    VIEW_MASK_ARTIFACT,
)

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "mlflow" / "entrypoint.sh"
ARTIFACT_BUCKET, CHECKPOINT_BUCKET = "mlflow-artifacts", "transferlab-checkpoints"

STUDY = {
    "study": "server-tiny",
    # A class-filtered source, so the pretraining run stores an artifact (its class mask).
    "sources": {"mnist": {"uri": "builtin:mnist", "keep_classes": [0, 1, 2, 3, 4]}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "method": "supervised",
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 1,
        "batch_size": 32,
        "sweep": {"source": ["mnist"], "pretrain_size": [200], "label_noise": [0.0], "seed": [0]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1, "full"], "seeds": [0]},
    "resources": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bindir() -> Path | None:
    """The server binaries of the newest installed PostgreSQL (Debian/Ubuntu layout, or PATH)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[::-1]:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, password-authenticated over TCP,
    with a ``mlflow`` role owning the tracking and the auth databases."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[test]')")
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install the distribution's "
            "postgresql package (.ci/run does) to run the tracking-server test"
        )
    # initdb and postgres refuse to run as root: run them as the `postgres` system user.
    as_owner: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="transferlab-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    superuser_password = secrets.token_urlsafe(16)
    (root / "pw").write_text(superuser_password)
    if as_owner:
        os.chown(root / "pw", owner.pw_uid, owner.pw_gid)
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run(as_owner + [str(bindir / args[0]), *args[1:]], check=True, capture_output=True, timeout=120)

    started = False
    try:
        pg(
            "initdb",
            "-D",
            str(data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={root / 'pw'}",
        )
        pg(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(root / "postgres.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        )
        started = True
        admin = Postgres("127.0.0.1", port, "postgres", superuser_password)
        mlflow_role = Postgres("127.0.0.1", port, "mlflow", secrets.token_urlsafe(16))
        conn = admin.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE mlflow LOGIN PASSWORD '{mlflow_role.password}'")
            cur.execute("CREATE DATABASE mlflow OWNER mlflow")
            cur.execute("CREATE DATABASE mlflow_auth OWNER mlflow")
        conn.close()
        yield mlflow_role
    finally:
        if started:
            subprocess.run(
                as_owner + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Server:
    url: str
    admin: tuple[str, str]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


# Slow: the deploy image's entrypoint starts a real mlflow server on PostgreSQL + S3, once per module.
@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """``deploy/mlflow/entrypoint.sh`` as the image runs it, configured only by environment."""
    import boto3
    import requests

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for bucket in (ARTIFACT_BUCKET, CHECKPOINT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    port = _free_port()
    admin = ("admin", secrets.token_urlsafe(18))
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_BACKEND_STORE_URI=f"postgresql+psycopg2://mlflow@127.0.0.1:{postgres.port}/mlflow",
        MLFLOW_AUTH_DATABASE_URI=f"postgresql+psycopg2://mlflow@127.0.0.1:{postgres.port}/mlflow_auth",
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{ARTIFACT_BUCKET}/artifacts",
        MLFLOW_S3_ENDPOINT_URL=s3_server,
        MLFLOW_ALLOWED_HOSTS=f"127.0.0.1:{port},localhost:{port}",
        PGPASSWORD=postgres.password,
        MLFLOW_AUTH_ADMIN_USERNAME=admin[0],
        MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    server = Server(f"http://127.0.0.1:{port}", admin, log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 120 s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def researcher(mlflow_server):
    """A real, non-admin MLflow user, created by the admin through the auth REST API."""
    import requests

    user = ("researcher", secrets.token_urlsafe(18))
    r = requests.post(
        f"{mlflow_server.url}/api/2.0/mlflow/users/create",
        auth=mlflow_server.admin,
        json={"username": user[0], "password": user[1]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return user


# Slow: its time is the module's PostgreSQL + mlflow_server start-up, which the study test reuses.
def test_the_server_refuses_strangers(mlflow_server, researcher):
    import requests

    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=(researcher[0], "not-the-password"), timeout=30).status_code == 401
    assert requests.get(search, auth=researcher, timeout=30).status_code == 200
    # --allowed-hosts: a request for a host name the server does not serve (DNS rebinding).
    assert requests.get(search, auth=researcher, headers={"Host": "evil.example"}, timeout=30).status_code == 403
    # A non-admin cannot create users.
    r = requests.post(
        f"{mlflow_server.url}/api/2.0/mlflow/users/create",
        auth=researcher,
        json={"username": "mallory", "password": secrets.token_urlsafe(18)},
        timeout=30,
    )
    assert r.status_code == 403


# Slow (~105 s): one packed run and two fits, but every record goes through the deployed server (PostgreSQL, S3
# artifacts, basic auth); then every artifact is read back and the study run again to show nothing is added.
def test_a_study_runs_against_the_server_and_reads_back(
    ray_cluster, mlflow_server, researcher, postgres, s3_server, tmp_path, monkeypatch, capsys
):
    import boto3
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", researcher[0])
    # The password as the KubeRay manifests give it: a file of a mounted Secret, which wins over
    # a stale variable, on the driver and on every trial (Ray workers get only its path).
    (tmp_path / "mlflow-password").write_text(researcher[1] + "\n")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(tmp_path / "mlflow-password"))
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "stale-password")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    storage = f"s3://{CHECKPOINT_BUCKET}/studies"
    argv = ["run", str(study), "--tracking-uri", mlflow_server.url, "--storage-path", storage]
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, f"{out.out}\n{out.err}\n{mlflow_server.log_tail()}"
    assert researcher[1] not in out.out + out.err

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("server-tiny")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied: clients never touch S3
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_kind = {
        k: [r for r in runs if r.data.tags.get(TAG_KIND) == k] for k in (KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER)
    }
    assert [len(v) for v in by_kind.values()] == [1, 1, 2]
    assert {r.info.status for r in runs} == {"FINISHED"}

    pretrain = by_kind[KIND_PRETRAIN][0]
    assert sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "train_loss")) == [0]
    assert 0.0 <= pretrain.data.metrics["upstream_accuracy"] <= 1.0
    assert pretrain.data.tags[TAG_CHECKPOINT].startswith(f"s3://{CHECKPOINT_BUCKET}/studies/")

    s3 = boto3.client("s3", endpoint_url=s3_server)

    def objects(bucket: str, prefix: str = "") -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o for page in pages for o in page.get("Contents", [])}

    # The Train checkpoint is on the S3-compatible store, where every node (and a retry) finds it.
    ckpt_prefix = pretrain.data.tags[TAG_CHECKPOINT][len(f"s3://{CHECKPOINT_BUCKET}/") :]
    assert any(k.startswith(ckpt_prefix + "/") for k in objects(CHECKPOINT_BUCKET, ckpt_prefix))
    for r in by_kind[KIND_TRANSFER]:
        assert 0.1 <= r.data.metrics["accuracy"] <= 1.0

    # Every artifact of every run, downloaded through the server, is byte for byte the object the
    # server stored in the bucket.
    stored = objects(ARTIFACT_BUCKET)

    def walk(run_id: str, path: str | None = None):
        for f in client.list_artifacts(run_id, path):
            yield from walk(run_id, f.path) if f.is_dir else [f.path]

    seen = {}
    for r in runs:
        for path in walk(r.info.run_id):
            local = Path(client.download_artifacts(r.info.run_id, path, str(tmp_path / r.info.run_id)))
            key = next(k for k in stored if k.endswith(f"/{r.info.run_id}/artifacts/{path}"))
            assert s3.get_object(Bucket=ARTIFACT_BUCKET, Key=key)["Body"].read() == local.read_bytes()
            seen[(r.info.run_id, path)] = local
    mask = json.loads(seen[(pretrain.info.run_id, VIEW_MASK_ARTIFACT)].read_text())
    assert mask["included"] == [c < 5 for c in range(10)]

    # The records are in PostgreSQL, not in some local fallback store.
    with postgres.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == len(runs)

    # Credentials reached the workers without becoming part of any record.
    for r in runs:
        for value in list(r.data.params.values()) + list(r.data.tags.values()):
            assert researcher[1] not in value
        assert not any("MLFLOW_TRACKING" in k for k in list(r.data.params) + list(r.data.tags))

    # Permissions: the researcher created the experiment, so manages it; any other user only
    # reads it (default_permission = READ).
    import requests

    observer = ("observer", secrets.token_urlsafe(18))
    assert (
        requests.post(
            f"{mlflow_server.url}/api/2.0/mlflow/users/create",
            auth=mlflow_server.admin,
            json={"username": observer[0], "password": observer[1]},
            timeout=30,
        ).status_code
        == 200
    )
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    assert (
        requests.post(
            f"{api}/runs/search", auth=observer, json={"experiment_ids": [exp.experiment_id]}, timeout=30
        ).status_code
        == 200
    )
    assert (
        requests.post(
            f"{api}/runs/create", auth=observer, json={"experiment_id": exp.experiment_id}, timeout=30
        ).status_code
        == 403
    )

    # A retried job (same study, same storage) finds everything done and adds nothing.
    assert main(argv) == 0
    assert "ran 0/1 pretraining runs and 0/2 transfer fits" in capsys.readouterr().out
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == len(runs)

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException):
        MlflowClient(mlflow_server.url).get_experiment_by_name("server-tiny")
