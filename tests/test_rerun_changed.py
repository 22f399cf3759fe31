"""Issue 24's leftovers: Tune trials named as their MLflow runs, training curves every N steps,
and ``run --rerun-changed`` (results another code computed are computed again, once)."""

import socket
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.execution.phase import trial_name
from orchestrator.records import spool
from orchestrator.records.provenance import code_digest
from orchestrator.records.results import transfer_frame
from orchestrator.records.schema import (
    FAILED,
    KIND_PRETRAIN,
    KIND_TRANSFER,
    TAG_CODE_DIGEST,
    TAG_KIND,
    TAG_PARENT,
    TAG_SUPERSEDED_BY,
)
from orchestrator.records.tracker import Tracker, run_per_config, superseded, unfinished_reruns
from orchestrator.records.train_callback import MLflowReportCallback
from trainers.protocols import STEP_LOSSES

OTHER_CODE = "0123456789abcdef"


def test_trial_names_are_the_run_names_made_safe_and_short():
    assert (
        trial_name("supervised mnist n=300 noise=0.5", "a1b2c_00000") == "supervised_mnist_n=300_noise=0.5_a1b2c_00000"
    )
    assert (
        trial_name("supervised mnist n=300 -> digits (4 fits)", "a1b2c_00001")
        == "supervised_mnist_n=300_to_digits_4_fits_a1b2c_00001"
    )
    long = trial_name("clip/laion " * 30, "a1b2c_00002")
    assert len(long) == 100 and long.endswith("_a1b2c_00002") and "/" not in long and " " not in long


def test_step_losses_become_a_curve_logged_once(tracking_uri):
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("cb")
    run_id = tracker.create_run(exp, KIND_PRETRAIN, "cb", "r", "h", {})
    report = {"epoch": 0, "train_loss": 2.0, STEP_LOSSES: [[10, 2.5], [20, 1.9]]}
    MLflowReportCallback(tracking_uri, run_id).after_report(None, [report], None)
    # A restarted controller reports the epoch again: nothing is logged twice.
    fresh = MLflowReportCallback(tracking_uri, run_id)
    fresh.after_report(None, [report], None)
    fresh.after_report(None, [{"epoch": 1, "train_loss": 1.0, STEP_LOSSES: [[30, 1.1]]}], None)
    curve = tracker.client.get_metric_history(run_id, "train_loss_step")
    assert sorted((m.step, m.value) for m in curve) == [(10, 2.5), (20, 1.9), (30, 1.1)]
    assert sorted(m.step for m in tracker.client.get_metric_history(run_id, "train_loss")) == [0, 1]
    assert STEP_LOSSES not in tracker.client.get_run(run_id).data.metrics


def test_step_losses_wait_in_the_spool_while_the_server_is_down(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("cb")
    run_id = tracker.create_run(exp, KIND_PRETRAIN, "cb", "r", "h", {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    storage = str(tmp_path / "storage")
    cb = MLflowReportCallback(down, run_id, spool_storage=storage, experiment_id=exp)
    cb.after_report(None, [{"epoch": 0, "train_loss": 2.0, STEP_LOSSES: [[2, 2.4], [4, 2.1]]}], None)
    assert list(Path(storage).rglob("*.json"))
    spool.flush(storage, spool.scope(down, exp), tracker.client, run_id)
    curve = tracker.client.get_metric_history(run_id, "train_loss_step")
    assert sorted((m.step, m.value) for m in curve) == [(2, 2.4), (4, 2.1)]
    assert not list(Path(storage).rglob("*.json"))


def test_a_recomputation_is_resumed_and_then_supersedes_the_old_run(tracking_uri):
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("jobs")
    old = tracker.create_run(exp, KIND_PRETRAIN, "jobs", "a", "h1", {})
    tracker.finish(old)
    again = tracker.create_run(exp, KIND_PRETRAIN, "jobs", "a", "h1", {})
    tracker.finish(again, FAILED)  # the recomputation failed: the old run still stands
    runs = tracker.runs(exp, KIND_PRETRAIN)
    assert run_per_config(runs)["h1"].info.run_id == old
    assert unfinished_reruns(runs)["h1"].info.run_id == again and superseded(runs) == {}
    tracker.reopen(again)
    tracker.finish(again)
    runs = tracker.runs(exp, KIND_PRETRAIN)
    assert run_per_config(runs)["h1"].info.run_id == again and unfinished_reruns(runs) == {}
    assert superseded(runs) == {old: again}
    tracker.log(old, tags={TAG_SUPERSEDED_BY: again})
    assert superseded(tracker.runs(exp, KIND_PRETRAIN)) == {}


RR = {
    "study": "rr",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "method": "supervised",
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 2,
        "batch_size": 32,
        "log_every_steps": 2,
        "sweep": {"source": ["mnist"], "pretrain_size": [200], "label_noise": [0.0, 0.5], "seed": [0]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1, "full"], "seeds": [0]},
    "resources": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
}


def _runs(client, kind):
    exp = client.get_experiment_by_name("rr")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=1000)


# Slow (~60 s): two real `run`s of a 2-run packed study, each with its Tune phases (the second recomputes 1 run and 3
# fits): --rerun-changed needs finished results first, then computes some of them again.
@pytest.mark.timeout(900)
def test_rerun_changed_computes_other_codes_results_again_once(ray_cluster, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(RR))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    run = ["run", str(study), "--tracking-uri", uri, "--storage-path", str(storage)]
    assert main(run) == 0
    client = MlflowClient(uri)
    pre = {r.data.params["label_noise"]: r for r in _runs(client, KIND_PRETRAIN)}
    assert len(pre) == 2 and len(_runs(client, KIND_TRANSFER)) == 4

    # Tune's trial folders carry the run names; pretraining curves have a point every 2 steps.
    dirs = {p.name for p in storage.glob("rr-*/*") if p.is_dir()}
    for r in pre.values():
        prefix = trial_name(r.info.run_name, "")
        assert any(d.startswith(prefix) for d in dirs), (prefix, dirs)
    assert any("_to_digits_2_fits_" in d for d in dirs)
    curve = client.get_metric_history(pre["0.0"].info.run_id, "train_loss_step")
    # The runs are packed (pretrain.pack: auto): ceil(2 epochs · 200 / 32) = 13 steps in all.
    assert sorted(m.step for m in curve) == list(range(2, 14, 2))

    # How often a run logs is not part of what it computes: nothing to run.
    capsys.readouterr()
    plan = ["plan", str(study), "--tracking-uri", uri]
    assert main([*plan, "pretrain.log_every_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "0 to run" in out and "2 finished (cached)" in out and "4 finished (cached)" in out

    # As if an earlier trainers/ had computed pretraining run noise=0 and one fit of noise=0.5.
    client.set_tag(pre["0.0"].info.run_id, TAG_CODE_DIGEST, OTHER_CODE)
    other_fit = next(r for r in _runs(client, KIND_TRANSFER) if r.data.tags[TAG_PARENT] == pre["0.5"].info.run_id)
    client.set_tag(other_fit.info.run_id, TAG_CODE_DIGEST, OTHER_CODE)
    assert main(plan) == 0
    assert "note: 2 cached result(s) were computed by other code" in capsys.readouterr().out
    assert main([*plan, "--rerun-changed"]) == 0
    out = capsys.readouterr().out
    assert "1 computed by other code (rerun), 1 finished (cached)" in out
    assert "3 to run (3 computed again" in out and "note:" not in out

    assert main([*run, "--rerun-changed"]) == 0
    out = capsys.readouterr().out
    assert "--rerun-changed: 1 pretraining run(s) and 3 transfer fit(s)" in out
    assert "ran 1/2 pretraining runs and 3/4 transfer fits" in out
    # Nothing lost: the old runs are kept, each tagged with the run that replaced it; one run
    # per job stands, computed by today's code, and the results table has each fit once.
    all_pre, all_fits = _runs(client, KIND_PRETRAIN), _runs(client, KIND_TRANSFER)
    assert (len(all_pre), len(all_fits)) == (3, 7)
    standing = {**run_per_config(all_pre), **run_per_config(all_fits)}
    assert len(standing) == 6
    assert all(r.data.tags[TAG_CODE_DIGEST] == code_digest() for r in standing.values())
    kept = {r.info.run_id for r in standing.values()}
    old = [r for r in all_pre + all_fits if r.info.run_id not in kept]
    assert {r.info.run_id for r in old} == {pre["0.0"].info.run_id, other_fit.info.run_id} | {
        r.info.run_id for r in all_fits if r.data.tags[TAG_PARENT] == pre["0.0"].info.run_id
    }
    assert all(r.data.tags[TAG_SUPERSEDED_BY] in kept for r in old)
    assert len(transfer_frame(Tracker(uri), "rr")) == 4
    assert main([*run, "--rerun-changed"]) == 0
    assert "ran 0/2 pretraining runs and 0/4 transfer fits" in capsys.readouterr().out
