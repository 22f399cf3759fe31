"""`transferlab submit / status / logs / stop` against a real `ray start` cluster on loopback,
with token auth on, and the submission they build (what travels, what never does)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.execution import ray_jobs as jobs
from orchestrator.records.credentials import apply_mlflow_client_env, load_credential_files, mlflow_client_env
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "planted-ray-token-" + uuid.uuid4().hex
PASSWORD = "planted-mlflow-password-" + uuid.uuid4().hex

TINY = {
    "study": "tiny-submit",
    "sources": {"digits": {"uri": "builtin:digits"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "method": "supervised",
        "model": "tiny-cnn",
        "image_size": 8,
        "epochs": 1,
        "batch_size": 32,
        "sweep": {"source": ["digits"], "pretrain_size": [200], "label_noise": [0.0], "seed": [0]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
    "resources": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
}


def _write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


# --- the submission, built without a cluster -------------------------------------------------


@pytest.fixture
def project(tmp_path):
    """A project folder with code, a study, and what must never travel."""
    root = tmp_path / "lab"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    for junk in (".venv/lib/site.py", "data/shard-0.parquet", "mlflow.db", "pkg/__pycache__/a.pyc"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    # Secrets by name, as an operator following the deploy docs leaves them (never uploaded), and
    # code whose name only looks like one (uploaded).
    secrets = ("deploy/.env", "deploy/.env.prod", ".aws/config", "certs/tls.pem", "gcp-credentials.json", "id_ed25519")
    for secret in secrets:
        (root / secret).parent.mkdir(parents=True, exist_ok=True)
        (root / secret).write_text("secret")
    (root / "pkg" / "credentials.py").write_text("x = 2\n")
    _write(root / "studies" / "tiny.yaml", TINY)
    return root


def test_submission_carries_what_the_cluster_needs_and_no_token(project, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    study = project / "studies" / "tiny.yaml"
    spec = load_spec(study, ["transfer.seeds=[0,1]"])
    sub, doc = jobs.build_submission(
        spec,
        str(study),
        str(project),
        "https://ray-user:uri-secret@mlflow.lab:443",
        "s3://bucket/studies",
        loopback=False,
    )
    # No venv, data, local store, bytecode or secret.
    assert sub.files == ["pkg/a.py", "pkg/credentials.py", "studies/tiny.yaml"]
    assert jobs.upload_summary(sub.files) == "pkg/ (2), studies/ (1)"
    assert sub.study_path == "studies/tiny.yaml" and doc["transfer"]["seeds"] == [0, 1]  # overrides applied
    assert sub.entrypoint == (
        "transferlab run studies/tiny.yaml --address auto --tracking-uri https://mlflow.lab:443 "
        "--storage-path s3://bucket/studies --verbose"  # the trials' own output in the job's log
    )
    # Neither MLflow credentials nor the Ray token travel in the job's environment (Ray's
    # dashboard shows it): the cluster has its own; submit names what it withheld.
    assert sub.env_vars == {"MLFLOW_TRACKING_URI": "https://mlflow.lab:443"}
    assert sub.credentials == ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"]
    everything = repr((sub.entrypoint, sub.env_vars, doc, sub.submission_id, sub.credentials))
    assert not [s for s in (TOKEN, PASSWORD, "uri-secret") if s in everything]
    # The id is the study's: the same submission gets it again, a changed one does not.
    again, _ = jobs.build_submission(
        load_spec(study, ["transfer.seeds=[0,1]"]),
        str(study),
        str(project),
        "https://mlflow.lab:443",
        "s3://bucket/studies",
        loopback=False,
    )
    other, _ = jobs.build_submission(
        load_spec(study), str(study), str(project), "https://mlflow.lab:443", "s3://bucket/studies", loopback=False
    )
    assert again.submission_id == sub.submission_id != other.submission_id
    assert sub.submission_id.startswith("transferlab-tiny-submit-")
    assert jobs.local_stores(sub) == (None, None)  # nothing here to check: the server may be cluster-internal
    assert jobs.scrub(f"x {TOKEN} {PASSWORD} http://u:{PASSWORD}@h y") == "x *** *** http://***@h y"
    pins = jobs.pinned_requirements()
    assert "torch" in {p.split("==")[0] for p in pins} and not any(p.startswith("ray") for p in pins)


def test_mlflow_credentials_are_sent_only_when_asked_and_files_are_read_here(project, monkeypatch, tmp_path):
    """``--send-credentials`` sends them by value (the URI's win); a ``*_FILE`` path of this
    machine never travels, its content does (only when asked)."""
    study = project / "studies" / "tiny.yaml"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    sub, _ = jobs.build_submission(
        load_spec(study),
        str(study),
        str(project),
        "https://ray-user:uri-secret@mlflow.lab:443",
        "s3://b/p",
        loopback=False,
        send_credentials=True,
    )
    assert sub.env_vars == {
        "MLFLOW_TRACKING_URI": "https://mlflow.lab:443",
        "MLFLOW_TRACKING_USERNAME": "ray-user",
        "MLFLOW_TRACKING_PASSWORD": "uri-secret",
    }
    secret = tmp_path / "mlflow-password"
    secret.write_text("from-a-file\n")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret))
    load_credential_files()  # what `transferlab` does first
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-a-file"
    for send, expected in ((False, {}), (True, {"MLFLOW_TRACKING_PASSWORD": "from-a-file"})):
        sub, _ = jobs.build_submission(
            load_spec(study),
            str(study),
            str(project),
            "https://mlflow.lab:443",
            "s3://b/p",
            False,
            send_credentials=send,
        )
        assert sub.env_vars == {"MLFLOW_TRACKING_URI": "https://mlflow.lab:443", **expected}
        assert sub.credentials == ["MLFLOW_TRACKING_PASSWORD"]
    # Trials get the path, not the secret, and read the file on their own node.
    assert mlflow_client_env() == {"MLFLOW_TRACKING_PASSWORD_FILE": str(secret)}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "stale")
    apply_mlflow_client_env(mlflow_client_env())
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-a-file"


@pytest.mark.parametrize(
    "content, message", [(None, "cannot read"), ("\n", "is empty"), ("x" * 70_000, "holds 70000 bytes")]
)
def test_an_unreadable_credential_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content, message):
    secret = tmp_path / "mlflow-password"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret))
    assert main(["schema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLFLOW_TRACKING_PASSWORD_FILE: {secret}: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tracking-uri", "sqlite:///mlflow.db", "--storage-path", "s3://b/p"],
            "--tracking-uri: sqlite:///mlflow.db is a file on this machine",
        ),
        (
            ["--tracking-uri", "http://mlflow:5000"],
            "--storage-path: the default ./transferlab_storage is a folder on this machine",
        ),
        (
            ["--tracking-uri", "http://mlflow:5000", "--storage-path", "ckpt"],
            "--storage-path: ckpt is a folder on this machine",
        ),
    ],
)
def test_remote_cluster_refuses_local_stores(project, capsys, extra, message):
    argv = [
        "submit",
        str(project / "studies" / "tiny.yaml"),
        "--address",
        "http://10.255.0.1:8265",
        "--working-dir",
        str(project),
    ]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_oversized_working_dir_and_unreachable_cluster(project, capsys, tmp_path):
    with open(project / "pkg" / "weights.bin", "wb") as f:  # sparse: 600 MiB that take no disk
        f.truncate(600 * 2**20)
    argv = [
        "submit",
        str(project / "studies" / "tiny.yaml"),
        "--working-dir",
        str(project),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
        "--storage-path",
        str(tmp_path / "st"),
    ]
    assert main(argv + ["--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --working-dir: ")
        and "over Ray's 512 MiB limit; largest: pkg/weights.bin (600 MiB)" in err
    )
    (project / "pkg" / "weights.bin").unlink()
    port = _free_port()
    for command in (
        argv + ["--address", f"http://127.0.0.1:{port}"],
        ["status", "some-job", "--address", f"127.0.0.1:{port}"],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert (
            err == f"error: --address: cannot use the Ray job API at http://127.0.0.1:{port}: connection refused "
            "(is the dashboard running, and is the port forwarded?)\n"
        )


def test_submit_says_whether_it_sends_mlflow_credentials(project, capsys, monkeypatch):
    """One line before anything is contacted: a `note:` that they stay here, or a `warning:`
    with --send-credentials; never the password itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    argv = ["submit", str(project / "studies" / "tiny.yaml"), "--working-dir", str(project)]
    argv += ["--tracking-uri", "https://mlflow.lab", "--storage-path", "s3://b/p", "--address", "http://127.0.0.1:9"]
    for extra, first in (
        ([], "note: MLflow credentials of this environment are not sent"),
        (["--send-credentials"], "warning: MLflow credentials go in the job's env_vars"),
    ):
        assert main(argv + extra) == 2  # nobody listens on port 9
        lines = capsys.readouterr().err.splitlines()
        assert lines[0].startswith(first) and lines[1].startswith("error: --address: "), lines
        assert PASSWORD not in "".join(lines)


# --- a real cluster --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``marker``: the cluster's, its workers, job drivers
    (which Ray starts in sessions of their own), whatever they left behind."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _kill(marker: str) -> None:
    import signal

    # A short grace: this throwaway cluster holds nothing to flush, and a process that ignores
    # SIGTERM (measured: teardown took the full grace, ~12 s) is SIGKILLed sooner.
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in _marked(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on loopback with token auth, its own temp dir and ports.

    Not `ray stop` afterwards: it stops every Ray of this user on the machine (other tests'
    and other people's). Every process of this cluster carries a marker in its environment,
    and exactly those are ended.
    """
    marker = f"TRANSFERLAB_TEST_CLUSTER={uuid.uuid4().hex}"
    temp = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        {
            marker.split("=")[0]: marker.split("=")[1],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": TOKEN,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    gcs, dash = _free_port(), _free_port()
    ports = {
        f"--{name}": str(_free_port())
        for name in (
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--num-cpus",
        "4",
        "--include-dashboard=true",
        "--disable-usage-stats",
        "--temp-dir",
        temp,
        *[x for kv in ports.items() for x in kv],
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
        if started.returncode != 0:
            pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
        yield {"gcs": f"127.0.0.1:{gcs}", "api": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        _kill(marker)
        assert not _marked(marker), "processes of the test cluster are still running"
        shutil.rmtree(temp, ignore_errors=True)


LIST_ACTORS = """import json, sys
from ray.util.state import list_actors
print(json.dumps([[a.class_name, a.repr_name] for a in list_actors(address=sys.argv[1], limit=10000, detail=True)]))"""


def _cli(*args, env_extra=None, timeout=420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        {"PYTHONPATH": str(REPO), "RAY_AUTH_TOKEN": TOKEN, "MLFLOW_TRACKING_PASSWORD": PASSWORD, **(env_extra or {})}
    )
    out = subprocess.run(
        [str(BIN / "transferlab"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    for stream in (out.stdout, out.stderr):
        assert TOKEN not in stream and PASSWORD not in stream, f"a secret was printed by transferlab {args[0]}"
    return out


# Slow (~60 s): a real `ray start` cluster, two submitted jobs and a `run` that joins it: submit/status/logs/stop
# against a job server (the cluster's start is the module's `head` fixture).
@pytest.mark.timeout(900)  # 273-433 s measured on 2 shared cores at load average 25-37 (the job alone: 135 s)
def test_submit_status_logs_run_stop_on_a_cluster(head, tmp_path):
    import mlflow

    from orchestrator.records.schema import KIND_PRETRAIN, KIND_TRANSFER, TAG_KIND

    study = _write(tmp_path / "tiny.yaml", TINY)
    db = tmp_path / "mlflow.db"
    where = ["--address", head["api"], "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "storage")]

    out = _cli("submit", str(study), *where, "--follow")  # the job's log streamed, then its final status
    assert out.returncode == 0, out.stdout + out.stderr
    job = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted: "))
    assert job.startswith("transferlab-tiny-submit-")
    assert out.stdout.index("ran 1/1 pretraining runs and 1/1 transfer fits") < out.stdout.index(
        f"{job}: SUCCEEDED (exit code 0)"
    )

    status = _cli("status", job, "--address", head["api"])
    assert status.returncode == 0 and status.stdout.startswith(f"{job}: SUCCEEDED")
    assert "runs: transferlab run tiny-submit.yaml --address auto" in status.stdout  # staged under the study name
    logs = _cli("logs", job, "--address", head["api"])
    assert "ran 1/1 pretraining runs and 1/1 transfer fits" in logs.stdout

    # The dashboard's actor list (Ray's state API) names the job's trial processes after their runs.
    listed = subprocess.run(
        [sys.executable, "-c", LIST_ACTORS, head["api"]],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    actors = json.loads(listed.stdout or "null") or pytest.fail(listed.stderr[-2000:])
    # Its one small run is packed (pretrain.pack: auto): the packed trial names its pack's runs.
    assert any(c == "pretrain_packed_trial" and "supervised digits n=200 noise=0" in r for c, r in actors), actors
    assert ["transfer_trial", "supervised digits n=200 noise=0 -> digits (1 fits)"] in actors, actors

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tiny-submit").experiment_id
    for kind in (KIND_PRETRAIN, KIND_TRANSFER):
        runs = client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{kind}'")
        assert [r.info.status for r in runs] == ["FINISHED"]

    # `run` joining the same cluster by its GCS address finds the study done.
    ran = _cli("run", str(study), "--address", head["gcs"], *where[2:], env_extra={"RAY_AUTH_MODE": "token"})
    assert ran.returncode == 0, ran.stderr
    assert "1 pretraining runs (1 already done), 1 transfer fits (1 already done)" in ran.stdout

    # A longer variant: submitted without waiting, submitted again while it runs, stopped.
    longer = [str(study), "pretrain.epochs=50", *where]
    first = _cli("submit", *longer, "--no-wait")
    second_job = next(line.split()[1] for line in first.stdout.splitlines() if line.startswith("submitted: "))
    assert second_job != job
    again = _cli("submit", *longer, "--no-wait")
    assert f"already running: {second_job}" in again.stdout and "submitted:" not in again.stdout
    stop = _cli("stop", second_job, "--address", head["api"])
    assert stop.returncode == 0 and f"{second_job}: STOPPED" in stop.stdout
    stopped = _cli("status", second_job, "--address", head["api"])
    assert stopped.stdout.startswith(f"{second_job}: STOPPED") and stopped.returncode == 130  # as Ctrl-C

    unknown = _cli("logs", "no-such-job", "--address", head["api"])
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: JOB: no job 'no-such-job' on this cluster")
    assert unknown.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "url, token, warned",
    [
        ("http://10.1.2.3:8265", "secret-token", True),
        ("http://ray-head.example.org:8265", "secret-token", True),
        ("https://ray-head.example.org", "secret-token", False),
        ("http://127.0.0.1:8265", "secret-token", False),
        ("http://localhost:8265", "secret-token", False),
        ("http://[::1]:8265", "secret-token", False),
        ("http://10.1.2.3:8265", None, False),
    ],
)
def test_a_token_sent_over_plain_http_to_another_machine_is_warned_about(url, token, warned):
    warning = jobs.plaintext_token_warning(url, token)
    assert bool(warning) == warned
    if warned:
        assert "plain http" in warning and "secret-token" not in warning
