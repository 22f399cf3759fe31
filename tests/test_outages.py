"""Failing infrastructure: a real ``mlflow server`` killed mid-study (and started again, or not),
a deleted checkpoint, and planted secrets that must not appear in any output.

The study runs through the CLI on the session's local Ray, against a real MLflow server process
on loopback whose backend is a sqlite file the test also reads directly (to time the outage
without asking the server).
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.records.schema import KIND_PRETRAIN, KIND_STUDY, KIND_TRANSFER, TAG_CHECKPOINT, TAG_KIND
from orchestrator.records.spool import SPOOL_DIR

pytestmark = pytest.mark.timeout(300)

SPEC = {
    "study": "outage",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 2,
        "batch_size": 32,
        "sweep": {"pretrain_size": [200], "label_noise": [0.0], "seed": [0]},
        "pack": "off",  # the outage hits the Train controller's report callback
    },
    "transfer": {"shots": [1, "full"], "seeds": [0]},
    "resources": {"workers": 1, "max_failures": 0},
}
PLANTED = {
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-" + secrets.token_hex(8),
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-" + secrets.token_hex(8),
    "RAY_AUTH_TOKEN": "planted-ray-token-" + secrets.token_hex(8),
}
URI_TOKEN = "planted-uri-token-" + secrets.token_hex(8)


def _pretrain_run_exists(db: Path, study: str) -> bool:
    """Read the server's sqlite store directly (read-only), so the probe needs no server."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return (
                con.execute(
                    "SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                    "JOIN tags t ON t.run_uuid = r.run_uuid WHERE e.name = ? AND t.key = ? AND t.value = ?",
                    (study, TAG_KIND, KIND_PRETRAIN),
                ).fetchone()[0]
                > 0
            )
    except sqlite3.Error:
        return False


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.2)


class Chaos(threading.Thread):
    """Kills the server once the study's pretraining run has started training (or ``trigger()`` is
    true); restarts it (same port, same store) once a training report had to be spooled, unless
    ``restart`` is False."""

    def __init__(self, server, study: str, storage: Path, restart: bool, trigger=None):
        super().__init__(daemon=True)
        self.server, self.study, self.storage, self.restart = server, study, storage, restart
        self.trigger = trigger
        self.killed_at = self.back_at = None
        self.spooled = False
        self.error: BaseException | None = None

    def run(self):
        try:
            if self.trigger is not None:
                _wait(self.trigger, 120, "the trigger")
            else:
                _wait(lambda: _pretrain_run_exists(self.server.db, self.study), 120, "the pretraining run")
                # The Train run's folder appears when fit() starts: the driver is inside Tune then.
                _wait(lambda: any(self.storage.glob("pretrain-*")), 120, "the training run to start")
            self.server.kill()
            self.killed_at = time.time()
            if not self.restart:
                return
            spool = self.storage / SPOOL_DIR
            _wait(lambda: spool.is_dir() and any(spool.rglob("*.json")), 120, "a spooled report")
            self.spooled = True
            time.sleep(2)
            self.server.start()
            self.back_at = time.time()
        except BaseException as e:  # surfaced by the test
            self.error = e


def _runs(client: MlflowClient, study: str, kind: str | None = None) -> list:
    exp = client.get_experiment_by_name(study)
    flt = f"tags.`{TAG_KIND}` = '{kind}'" if kind else ""
    return client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


# Slow (~90 s with the module's server start): one study (a pack-off TorchTrainer, 2 fits) while the tracking server is
# SIGKILLed and restarted; the outage must hit a report that the Train callback sends.
@pytest.fixture(scope="module")
def outage_study(ray_cluster, mlflow_server_process, tmp_path_factory):
    """The tiny study, run while the server is killed and restarted, with planted secrets."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("outage")
    for k, v in PLANTED.items():
        mp.setenv(k, v)
    mp.setenv("TRANSFERLAB_TRACKING_DEADLINE_S", "120")
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump(SPEC))
    storage = tmp / "storage"
    uri = mlflow_server_process.url.replace("http://", f"http://transferlab:{URI_TOKEN}@")
    argv = ["run", str(study), "--tracking-uri", uri, "--storage-path", str(storage)]
    chaos = Chaos(mlflow_server_process, "outage", storage, restart=True)
    chaos.start()
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    finally:
        chaos.join(timeout=180)
        mp.undo()
    yield {
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "chaos": chaos,
        "argv": argv,
        "t0": t0,
        "storage": storage,
        "tmp": tmp,
        "server": mlflow_server_process,
    }


# Slow: its time is the outage_study fixture: one study through a real server restart.
def test_study_survives_a_server_restart_without_losing_or_duplicating(outage_study):
    o = outage_study
    chaos = o["chaos"]
    assert chaos.error is None, chaos.error
    assert o["code"] == 0, o["out"] + o["err"] + o["server"].log_tail()
    assert chaos.killed_at and chaos.spooled and chaos.back_at  # the outage hit a training report
    client = MlflowClient(o["server"].url)
    runs = _runs(client, "outage")
    kinds = [r.data.tags[TAG_KIND] for r in runs]
    assert sorted(kinds) == sorted([KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER, KIND_TRANSFER])  # no duplicate run
    assert {r.info.status for r in runs} == {"FINISHED"}
    pre = next(r for r in runs if r.data.tags[TAG_KIND] == KIND_PRETRAIN)
    history = client.get_metric_history(pre.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1]  # each epoch once: nothing lost, nothing twice
    assert len(client.get_metric_history(pre.info.run_id, "upstream_accuracy")) == 1
    # At least one report was made while the server was down, and landed after it came back.
    reported_in_outage = [m for m in history if chaos.killed_at * 1000 <= m.timestamp <= chaos.back_at * 1000]
    assert reported_in_outage, (history, chaos.killed_at, chaos.back_at)
    assert not list((o["storage"] / SPOOL_DIR).rglob("*.json"))  # the spool was emptied
    for r in runs:
        if r.data.tags[TAG_KIND] == KIND_TRANSFER:
            assert 0.1 <= r.data.metrics["accuracy"] <= 1.0


def _files(root: Path):
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            yield p


def _known_ray_leak(path: Path, value: str) -> bool:
    """Ray Tune copies the driver's AWS_* variables into every trial's runtime_env, and Ray's
    runtime-env agent logs runtime envs at INFO in its own log file on each node. That is Ray's
    log, not transferlab's; docs/reliability.md says so and how to avoid it (no AWS keys in the
    driver's environment: instance roles or a credentials file)."""
    return path.name.startswith("runtime_env_agent") and value == PLANTED["AWS_SECRET_ACCESS_KEY"]


def test_planted_secrets_appear_in_no_output(outage_study, tmp_path):
    """Every output of the study: console, MLflow records and artifacts (and the server's whole
    store), the checkpoint storage, Ray's logs of this session, and `transferlab report`."""
    o = outage_study
    values = list(PLANTED.values()) + [URI_TOKEN]
    client = MlflowClient(o["server"].url)
    report_out = tmp_path / "report"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["report", "outage", "--tracking-uri", o["argv"][3], "--out", str(report_out), "--bootstrap", "0"])
    assert code == 0, out.getvalue() + err.getvalue()

    texts = {"stdout": o["out"], "stderr": o["err"], "report stdout": out.getvalue(), "report stderr": err.getvalue()}
    for r in _runs(client, "outage"):
        texts[f"run {r.info.run_id} records"] = repr((r.data.params, r.data.tags, sorted(r.data.metrics), r.info))
    blobs: dict[str, Path] = {}
    roots = [o["storage"], report_out, o["server"].root]  # server.root: its sqlite store and artifacts
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for root in roots:
        blobs.update({str(p): p for p in _files(root)})
    blobs.update({str(p): p for p in _files(session) if p.stat().st_mtime >= o["t0"] - 1})
    assert any("artifacts" in k for k in blobs) and any(SPOOL_DIR not in k and "pretrain-" in k for k in blobs)
    assert f"tracking: http://***@127.0.0.1:{o['server'].port}" in o["out"]  # printed, redacted
    leaks = [
        (where, v, text[max(0, text.find(v) - 200) : text.find(v) + 50])
        for where, text in texts.items()
        for v in values
        if v in text
    ]
    for where, path in blobs.items():
        data = path.read_bytes()
        leaks += [(where, v) for v in values if v.encode() in data and not _known_ray_leak(path, v)]
    assert not leaks, leaks
    assert len(texts) + len(blobs) > 20  # the scan saw the outputs it claims to


# Slow (~50 s): two runs of the study, each with a transfer phase: the first waits out a 6 s tracking deadline for
# real, the second resumes against the restarted server.
def test_server_down_past_the_deadline_stops_cleanly_and_resumes(outage_study, monkeypatch, capsys):
    """The server dies in the transfer phase of a grown study (one more shots value) and stays
    down past a 6 s deadline: exit 3 with the resume command; started again, the same command
    finishes the study with nothing lost and nothing doubled."""
    o, server = outage_study, outage_study["server"]
    monkeypatch.setenv("TRANSFERLAB_TRACKING_DEADLINE_S", "6")
    argv = o["argv"] + ["transfer.shots=[1,2,full]"]
    client = MlflowClient(server.url)
    before = {r.info.run_id for r in _runs(client, "outage")}
    earlier = set(o["storage"].glob("outage-transfer-*"))  # the transfer phase of the first run
    chaos = Chaos(
        server,
        "outage",
        o["storage"],
        restart=False,
        trigger=lambda: bool(set(o["storage"].glob("outage-transfer-*")) - earlier),
    )
    chaos.start()
    capsys.readouterr()
    code = main(argv)
    chaos.join(timeout=60)
    captured = capsys.readouterr()
    assert chaos.error is None and chaos.killed_at, chaos.error
    assert code == 3, captured.out + captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("stopped: tracking server http://***@127.0.0.1:") and "unreachable for" in last, captured.err
    command = "transferlab " + shlex.join(argv).replace(f"transferlab:{URI_TOKEN}@", "***@")
    assert last.endswith("resume with the same command: " + command), last
    assert "Traceback" not in captured.err

    server.start()  # back, same port, same store
    assert main(argv) == 0, capsys.readouterr()
    assert "ran 0/1 pretraining runs and 1/3 transfer fits" in capsys.readouterr().out
    runs = _runs(client, "outage")
    new = [r for r in runs if r.info.run_id not in before]
    assert [r.info.run_name for r in new] == ["linear_probe digits 2-shot seed=0"]  # one new run, not two
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len(client.get_metric_history(new[0].info.run_id, "accuracy")) == 1


def test_a_deleted_checkpoint_fails_its_fits_by_name_and_stays_resumable(outage_study, capsys):
    """Chosen behaviour: the transfer fits of a pretraining run whose checkpoint is gone fail,
    naming the run and how to redo it; nothing else is touched, and nothing crashes."""
    o = outage_study
    client = MlflowClient(o["server"].url)
    pre = _runs(client, "outage", KIND_PRETRAIN)[0]
    checkpoint = pre.data.tags[TAG_CHECKPOINT]
    shutil.rmtree(Path(checkpoint))
    before = len(_runs(client, "outage"))
    capsys.readouterr()
    code = main(o["argv"] + ["transfer.shots=[1,2,3,full]"])  # a new fit needs the deleted checkpoint
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert (
        f"checkpoint of pretraining run 'supervised mnist n=200 noise=0' (run {pre.info.run_id}) is missing: "
        f"{checkpoint}" in captured.err
    )
    assert f"mlflow runs delete --run-id {pre.info.run_id}" in captured.err
    assert "Traceback" not in captured.err
    assert len(_runs(client, "outage")) == before  # no half-made runs
    assert client.get_run(pre.info.run_id).info.status == "FINISHED"
