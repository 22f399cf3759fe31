"""A tiny study end to end on a real local Ray and a real sqlite MLflow store."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from datasets_ import prepare_builtin
from orchestrator.cli import main
from orchestrator.records.schema import (
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    TAG_CHECKPOINT,
    TAG_CONFIG_HASH,
    TAG_KIND,
    TAG_MODEL_ID,
    TAG_PARENT,
)
from orchestrator.records.tracker import Tracker
from orchestrator.records.train_callback import MLflowReportCallback

pytestmark = pytest.mark.timeout(900)

TINY = {
    "study": "tiny",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "method": "supervised",
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 2,
        "batch_size": 32,
        "sweep": {"source": ["mnist"], "pretrain_size": [300], "label_noise": [0.0, 0.5], "seed": [0]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1, 2, "full"], "seeds": [0, 1]},
    "resources": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
}


def _runs(client, kind):
    exp = client.get_experiment_by_name("tiny")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=1000)


# Slow: the tiny study through the CLI once per module; eight tests read what it recorded.
@pytest.fixture(scope="module")
def finished_study(ray_cluster, tmp_path_factory):
    """Run the tiny study once through the CLI; later tests inspect what it recorded."""
    tmp = tmp_path_factory.mktemp("study")
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump(TINY))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = ["run", str(study), "--tracking-uri", uri, "--storage-path", str(tmp / "storage")]
    assert main(argv) == 0
    return argv, uri


# Slow: its time is the finished_study fixture, which seven more tests reuse.
def test_mlflow_holds_the_schema(finished_study):
    _, uri = finished_study
    client = MlflowClient(uri)
    studies, pretrains, transfers = (_runs(client, k) for k in (KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER))
    assert len(studies) == 1 and len(pretrains) == 2 and len(transfers) == 2 * (2 * 2 + 1)
    assert {r.info.status for r in studies + pretrains + transfers} == {"FINISHED"}
    study_id = studies[0].info.run_id
    for r in pretrains:
        p = r.data.params
        assert {k: p[k] for k in ("method", "source", "pretrain_size", "model", "seed")} == {
            "method": "supervised",
            "source": "mnist",
            "pretrain_size": "300",
            "model": "tiny-cnn",
            "seed": "0",
        }
        assert p["label_noise"] in ("0.0", "0.5")
        assert r.data.tags[TAG_PARENT] == study_id
        assert r.data.tags[TAG_CONFIG_HASH]
        assert 0.0 <= r.data.metrics["upstream_accuracy"] <= 1.0
        history = client.get_metric_history(r.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [0, 1]
        assert r.info.run_name == f"supervised mnist n=300 noise={float(p['label_noise']):g}"
        (source,) = client.get_run(r.info.run_id).inputs.dataset_inputs  # the UI's Dataset column
        assert source.dataset.name == "mnist" and source.dataset.digest == prepare_builtin("mnist").fingerprint
        assert {t.key: t.value for t in source.tags} == {"mlflow.data.context": "training"}
    noisy = next(r for r in pretrains if r.data.params["label_noise"] == "0.5")
    assert 0.4 < noisy.data.metrics["realized_label_noise"] < 0.6
    parents = {r.info.run_id for r in pretrains}
    for r in transfers:
        assert r.data.tags[TAG_PARENT] in parents
        assert r.data.params["task"] == "digits" and r.data.params["protocol"] == "linear_probe"
        (task,) = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert task.dataset.name == "digits" and task.dataset.digest == prepare_builtin("digits").fingerprint
        assert 0.1 <= r.data.metrics["accuracy"] <= 1.0
        assert r.data.metrics["num_train_examples"] == (
            10 * int(r.data.params["shots"])
            if r.data.params["shots"] != "full"
            else r.data.metrics["num_train_examples"]
        )
    fulls = [r for r in transfers if r.data.params["shots"] == "full"]
    assert len(fulls) == 2 and all(r.data.params["seed"] == "0" for r in fulls)
    assert len({r.data.tags[TAG_CONFIG_HASH] for r in transfers}) == len(transfers)
    names = {r.info.run_name for r in transfers}
    assert "linear_probe digits 2-shot seed=1" in names and "linear_probe digits full seed=0" in names


def test_another_study_on_the_same_storage_trains_its_own_checkpoints(finished_study, tmp_path):
    """Same pretraining config, same storage, another experiment: its runs train every epoch
    into folders of their own, rather than "resuming" the first study's finished checkpoints."""
    argv, uri = finished_study
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "study": "tiny-again"}))
    assert main(["run", str(other), *argv[2:]]) == 0
    client = MlflowClient(uri)
    first = {r.data.tags[TAG_CHECKPOINT] for r in _runs(client, KIND_PRETRAIN)}
    exp = client.get_experiment_by_name("tiny-again")
    again = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'")
    assert len(again) == 2 and not first & {r.data.tags[TAG_CHECKPOINT] for r in again}
    for r in again:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")) == [0, 1]


def test_rerun_adds_no_run_and_resumes_an_interrupted_one(finished_study, capsys):
    argv, uri = finished_study
    client = MlflowClient(uri)
    before = {k: len(_runs(client, k)) for k in (KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER)}
    # A transfer run left RUNNING, as if the driver died before it finished.
    victim = _runs(client, KIND_TRANSFER)[0]
    client.update_run(victim.info.run_id, status="RUNNING")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 pretraining runs (2 already done), 10 transfer fits (9 already done)" in out
    assert "ran 0/2 pretraining runs and 1/10 transfer fits" in out
    after = {k: len(_runs(client, k)) for k in (KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER)}
    assert after == before
    assert client.get_run(victim.info.run_id).info.status == "FINISHED"
    assert main(argv) == 0
    assert "ran 0/2 pretraining runs and 0/10 transfer fits" in capsys.readouterr().out


def test_runs_command_prints_the_table(finished_study, capsys):
    _, uri = finished_study
    capsys.readouterr()
    assert main(["runs", "tiny", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("pretrain"))
    assert header.split()[-3:] == ["1-shot", "2-shot", "full"]
    rows = [line for line in lines if line.startswith("supervised mnist")]
    assert len(rows) == 2 and all(" ±" in r for r in rows)
    assert main(["runs", "nope", "--tracking-uri", uri]) == 2


def test_the_mlflow_ui_can_compare_transfer_runs_by_their_pretraining(finished_study, capsys):
    """What a reviewer needs in the MLflow UI, read back through the client the UI uses."""

    from orchestrator.records.provenance import PROJECT

    argv, uri = finished_study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    assert (
        "transferlab study `tiny`" in exp.tags["mlflow.note.content"]
        and "params.label_noise" in exp.tags["mlflow.note.content"]
    )
    # "1-shot accuracy against label noise at each pretraining size", from the transfer runs alone.
    one_shot = client.search_runs(
        [exp.experiment_id], f"tags.`{TAG_KIND}` = 'transfer' and params.shots = '1' and params.label_noise = '0.5'"
    )
    assert len(one_shot) == 2 and {r.data.params["pretrain_size"] for r in one_shot} == {"300"}
    for r in _runs(client, KIND_TRANSFER):
        p = r.data.params
        assert {k: p[k] for k in ("source", "method", "model", "pretrain_seed", "epochs")} == {
            "source": "mnist", "method": "supervised", "model": "tiny-cnn", "pretrain_seed": "0", "epochs": "2",
        }  # fmt: skip
    # Provenance on every run: who, which commit of which code.
    commit = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    for r in _runs(client, KIND_STUDY) + _runs(client, KIND_PRETRAIN) + _runs(client, KIND_TRANSFER):
        assert r.data.tags["mlflow.user"] and r.data.tags["transferlab.version"]
        assert r.data.tags["mlflow.source.git.commit"] == commit.strip()
        assert r.data.tags["transferlab.git_dirty"] in ("true", "false")
    # The study file as it ran, on the study run; `transferlab config` prints the same document.
    (study,) = _runs(client, KIND_STUDY)
    where = client.download_artifacts(study.info.run_id, "spec/study.yaml", str(Path(argv[1]).parent))
    stored = yaml.safe_load(Path(where).read_text())
    capsys.readouterr()
    assert main(["config", argv[1]]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == stored and stored["study"] == "tiny"
    assert main(["runs", "tiny", "--tracking-uri", uri, "--csv"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 10 and "label_noise" in table[0] and "accuracy" in table[0]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("transferlab 0.")


def test_plan_says_which_cached_results_other_code_computed(finished_study, capsys):
    argv, uri = finished_study
    plan = ["plan", argv[1], "--tracking-uri", uri]
    capsys.readouterr()
    assert main(plan) == 0 and "computed by other code" not in capsys.readouterr().out
    client = MlflowClient(uri)
    for r in _runs(client, KIND_TRANSFER)[:3]:  # as if an earlier trainers/ had computed these
        client.set_tag(r.info.run_id, "transferlab.code_digest", "0123456789abcdef")
    assert main(plan) == 0
    assert "note: 3 cached result(s) were computed by other code than today's" in capsys.readouterr().out


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"


def _browser(page: str, *args: str) -> subprocess.CompletedProcess:
    """Headless chromium on a page of the local `mlflow ui`, given time to run its scripts."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=20000", "--window-size=1600,1200", *args, page]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_the_mlflow_ui_answers_the_study_question_in_a_browser(finished_study, tmp_path):
    """A bare `mlflow ui` on the study's store, in headless chromium: the experiment opens on its
    runs with the study's description, and comparing transfer runs shows their pretraining params
    beside `accuracy`. TRANSFERLAB_UPDATE_SCREENSHOTS=1 also writes the README's screenshot."""
    _, uri = finished_study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    address = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    ui = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", address.rsplit(":", 1)[1], "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        runs_page = _browser(f"{address}/#/experiments/{exp.experiment_id}/runs", "--dump-dom").stdout
        assert "Training runs" in runs_page and "transferlab study" in runs_page  # not the GenAI overview
        two_shot = client.search_runs(
            [exp.experiment_id], f"tags.`{TAG_KIND}` = 'transfer' and params.shots = '2' and params.seed = '0'"
        )
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in two_shot]))
        compare = f"{address}/#/compare-runs?runs={ids}&experiments=%5B%22{exp.experiment_id}%22%5D"
        dom = _browser(compare, "--dump-dom").stdout
        for text in ("pretrain_size", "label_noise", "pretrain_seed", "accuracy", "linear_probe digits 2-shot seed=0"):
            assert text in dom, text
        shot = tmp_path / "mlflow-compare.png"
        _browser(compare, f"--screenshot={shot}")
        assert shot.stat().st_size > 50_000
        if os.environ.get("TRANSFERLAB_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(exist_ok=True)
            shutil.copy(shot, SCREENSHOTS / "mlflow-compare.png")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_checkpoints_are_loadable_without_pickle(finished_study):
    from ray.train import Checkpoint

    from trainers.pretrain import load_model

    _, uri = finished_study
    r = _runs(MlflowClient(uri), KIND_PRETRAIN)[0]
    with Checkpoint(r.data.tags[TAG_CHECKPOINT]).as_directory() as d:
        model = load_model(d)
    assert model.head.out_features == 10


def assert_checkpoints_are_logged_models(client, uri, pretrains, transfers) -> None:
    """Each pretraining run's checkpoint is a READY logged model whose source is the run, that
    loads back with mlflow.pytorch equal to the checkpoint; its transfer runs name it as their
    input; the run has system metrics from its training."""
    import mlflow
    import mlflow.pytorch
    import torch
    from ray.train import Checkpoint

    from trainers.pretrain import load_checkpoint

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # models:/ URIs are read from the global tracking store
    try:
        for r in pretrains:
            model_id = r.data.tags[TAG_MODEL_ID]
            logged = client.get_logged_model(model_id)
            assert (str(logged.status), logged.source_run_id, logged.model_type) == (
                "READY",
                r.info.run_id,
                "pretrained",
            )
            assert logged.params["pretrain_size"] == r.data.params["pretrain_size"]
            (output,) = client.get_run(r.info.run_id).outputs.model_outputs  # the run's "Logged models"
            assert (output.model_id, output.step) == (model_id, int(r.data.params["epochs"]) - 1)
            model = mlflow.pytorch.load_model(f"models:/{model_id}")
            with Checkpoint(r.data.tags[TAG_CHECKPOINT]).as_directory() as d:
                weights = load_checkpoint(d)["model"]
            loaded = model.state_dict()
            assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
            assert model.meta["config_hash"] == r.data.tags[TAG_CONFIG_HASH]
            cpu = client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")
            assert cpu and all(0.0 <= m.value <= 100.0 for m in cpu)
            assert client.get_run(r.info.run_id).data.metrics["system/system_memory_usage_megabytes"] > 0
    finally:
        mlflow.set_tracking_uri(before)
    models = {r.info.run_id: r.data.tags[TAG_MODEL_ID] for r in pretrains}
    for r in transfers:
        used = client.get_run(r.info.run_id).inputs.model_inputs
        assert [m.model_id for m in used] == [models[r.data.tags[TAG_PARENT]]]


def test_each_checkpoint_is_a_logged_model_its_transfer_runs_name(finished_study):
    _, uri = finished_study
    client = MlflowClient(uri)
    assert_checkpoints_are_logged_models(client, uri, _runs(client, KIND_PRETRAIN), _runs(client, KIND_TRANSFER))


# Slow (~30 s, a TorchTrainer fit): the tiny study's runs are packed; here one run trains in its own TorchTrainer.
def test_a_torchtrainer_run_is_a_logged_model_with_system_metrics(ray_cluster, tmp_path):
    doc = {**TINY, "study": "tiny-trainer", "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]}}
    doc["pretrain"] = {**TINY["pretrain"], "pack": "off", "sweep": {**TINY["pretrain"]["sweep"], "label_noise": [0.0]}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(doc))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(study), "--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-trainer").experiment_id
    pretrains, transfers = (
        client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{kind}'")
        for kind in (KIND_PRETRAIN, KIND_TRANSFER)
    )
    assert len(pretrains) == 1 and len(transfers) == 1 and "pack_size" not in pretrains[0].data.metrics
    assert_checkpoints_are_logged_models(client, uri, pretrains, transfers)


def test_report_callback_logs_each_step_once(tracking_uri):
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("cb")
    run_id = tracker.create_run(exp, KIND_PRETRAIN, "cb", "r", "h", {"a": 1})
    cb = MLflowReportCallback(tracking_uri, run_id)
    cb.after_report(None, [{"epoch": 0, "train_loss": 2.0}], None)
    cb.after_report(None, [{"epoch": 1, "train_loss": 1.0, "upstream_accuracy": 0.5}], None)
    # A restarted controller gets a fresh callback; re-reported epochs must not duplicate.
    fresh = MLflowReportCallback(tracking_uri, run_id)
    fresh.after_report(None, [{"epoch": 1, "train_loss": 1.0, "upstream_accuracy": 0.5}], None)
    fresh.after_report(None, [{"epoch": 2, "train_loss": 0.5}], None)
    history = tracker.client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0), (2, 0.5)]
    assert len(tracker.client.get_metric_history(run_id, "upstream_accuracy")) == 1


# A failing pretraining run that does not stop the study: tests/test_budget.py, whose study has a
# broken source already (a study of its own here cost two more TorchTrainer start-ups).
