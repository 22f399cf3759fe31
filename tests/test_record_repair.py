"""A pretraining run left without its params and class mask (the driver died right after creating
it) is repaired when the next driver reopens it; and an artifact store that fails is an error,
not a missing mask that analysis would read as "every class". Real sqlite stores; no Ray."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.analysis import AnalysisError
from orchestrator.analysis.frame import class_masks, load_study
from orchestrator.execution.study import open_pretrain_run
from orchestrator.planning.plan import build_plan
from orchestrator.records.schema import KIND_PRETRAIN, KIND_STUDY, TAG_CONFIG_HASH, TAG_KIND, TAG_PARENT, TAG_STUDY
from orchestrator.records.tracker import Tracker
from orchestrator.spec import load_spec

pytestmark = pytest.mark.timeout(120)

SPEC = {
    "study": "repair",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 1,
        "sweep": {"pretrain_size": [100], "label_noise": [0.4], "class_fraction": [0.5]},
    },
    "transfer": {"shots": [1], "seeds": [0]},
}


def test_a_run_created_but_never_given_params_or_mask_is_repaired_on_reopen(tmp_path, tracking_uri):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    plan = build_plan(load_spec(path))
    (job,) = plan.pretrain_runs
    assert job.view.keep_classes is not None
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("repair")
    study_run = tracker.create_run(exp, KIND_STUDY, "repair", "study repair", plan.spec_hash, {"study": "repair"})
    # What a driver killed inside Tracker.create_run leaves: the run and its tags, nothing else.
    tags = {TAG_KIND: KIND_PRETRAIN, TAG_STUDY: "repair", TAG_CONFIG_HASH: job.config_hash, TAG_PARENT: study_run}
    orphan = tracker.client.create_run(exp, run_name=job.run_name, tags=tags)
    assert orphan.data.params == {}

    prior = tracker.runs_by_hash(exp, KIND_PRETRAIN)[job.config_hash]
    source = ("builtin:mnist", "f00d")
    run_id = open_pretrain_run(tracker, exp, "repair", job, prior, study_run, source)
    assert run_id == orphan.info.run_id  # resumed into the same run, not a second one
    (given,) = tracker.client.get_run(run_id).inputs.dataset_inputs  # and told what it trains on
    assert (given.dataset.name, given.dataset.digest, given.dataset.source) == ("mnist", "f00d", "builtin:mnist")
    tracker.finish(run_id)  # as its trial would after training

    params = tracker.client.get_run(run_id).data.params
    assert params["label_noise"] == "0.4" and params["class_fraction"] == "0.5"
    row = load_study(tracker, "repair").pretrain.iloc[0]
    assert (row["label_noise"], row["class_fraction"]) == (0.4, 0.5)  # not the defaults 0 and 1
    classes, mask = class_masks([row["artifact_uri"]])
    assert len(classes) == 10 and mask.sum() == 5  # half the classes, not all
    # Reopening again (a second interruption) changes nothing and raises nothing.
    assert open_pretrain_run(tracker, exp, "repair", job, tracker.client.get_run(run_id), study_run, source) == run_id
    assert len(tracker.client.get_run(run_id).inputs.dataset_inputs) == 1


def test_an_unreachable_artifact_store_is_an_error_not_an_all_classes_mask(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker = Tracker(tracking_uri)
    local = tracker.client.create_run(tracker.experiment_id("local")).info.artifact_uri
    # Runs whose artifacts live behind an HTTP artifact server nobody answers (a server that is down).
    away = tracker.client.create_experiment("away", artifact_location="http://127.0.0.1:9/artifacts")
    remote = tracker.client.create_run(away).info.artifact_uri
    classes, mask = class_masks([local])
    assert classes == [] and mask.shape == (1, 0)  # no mask artifact at all: a study without subsets
    with pytest.raises(AnalysisError, match=r"^artifacts: cannot read view/class_mask.json of the run at http://127"):
        class_masks([local, remote])


def _log_task_input(uri: str, run_id: str, start) -> None:
    tracker = Tracker(uri)
    tracker.client.get_run(run_id)  # connected and warm, so the processes' inserts meet
    start.wait()
    tracker.log_inputs(run_id, [("digits", "d1615", "builtin:digits", "transfer")])


def test_trials_logging_the_same_dataset_at_once_all_record_it(tmp_path, tracking_uri):
    """Transfer trials of one task log the same dataset input at the same moment; the store keeps
    one dataset row per (experiment, name, digest), so all but one hit a unique constraint."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id("race")
    runs = [tracker.client.create_run(exp).info.run_id for _ in range(6)]
    start = ctx.Barrier(len(runs))
    procs = [ctx.Process(target=_log_task_input, args=(tracking_uri, r, start)) for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(runs)
    for r in runs:
        (given,) = tracker.client.get_run(r).inputs.dataset_inputs
        assert (given.dataset.name, given.dataset.digest) == ("digits", "d1615")
