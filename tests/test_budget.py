"""Budgets (budget.max_trials, budget.max_hours), the plan estimate, --fail-fast, phase progress,
and a failing pretraining run that is recorded and does not stop the study."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.planning import estimate
from orchestrator.records.schema import KIND_PRETRAIN, KIND_STUDY, TAG_KIND
from orchestrator.spec import SpecError, parse_spec

pytestmark = pytest.mark.timeout(900)

SPEC = {
    "study": "budgeted",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 1,
        "batch_size": 32,
        "sweep": {"pretrain_size": [100], "label_noise": [0.0, 0.5]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
}


@pytest.mark.parametrize(
    "budget, line",
    [
        ({"max_trials": 0}, "budget.max_trials: must be >= 1, got 0"),
        ({"max_trials": 2.5}, "budget.max_trials: must be an integer, got float 2.5"),
        ({"max_hours": -1}, "budget.max_hours: must be > 0, got -1"),
        ({"max_hours": "soon"}, "budget.max_hours: must be a number, got string 'soon'"),
        ({"max_minutes": 3}, "budget.max_minutes: unknown key; did you mean 'max_hours'?"),
    ],
)
def test_budget_fields_are_checked(budget, line):
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "budget": budget})
    assert str(e.value) == line


def test_phase_wall_time_packs_trials_on_the_slots():
    assert estimate.phase_seconds([10, 10, 10], 2) == 20
    assert estimate.phase_seconds([30, 10, 10, 10], 2) == 30
    assert estimate.phase_seconds([10, 10, 10], 1) == 30
    assert estimate.phase_seconds([], 4) == 0


def test_a_study_over_budget_is_refused_before_compute(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({**SPEC, "budget": {"max_trials": 3}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = (
        "budget.max_trials: the study would launch 4 Tune trials (2 pretraining, 2 transfer), 1 over the budget of 3"
    )
    for argv in (
        ["plan", str(study), "--tracking-uri", uri],
        ["validate", str(study)],
        ["run", str(study), "--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {trials}", argv
    assert main(["plan", str(study), "--tracking-uri", uri, "budget.max_trials=4"]) == 0
    out = capsys.readouterr().out
    assert "Tune trials:      4 (2 pretraining" in out and "budget: max_trials 4" in out
    assert main(["run", str(study), "--tracking-uri", uri, "budget.max_trials=null", "budget.max_hours=0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: budget.max_hours: the study is estimated at ") and "h over the budget of 0.001 h" in err
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "storage").exists()


def _runs(client, study):
    exp = client.get_experiment_by_name(study).experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp], max_results=1000)}


# Slow (~95 s): three runs of one study (budget stop, --fail-fast, default), each a real phase; its three pretraining
# fits are pack-off TorchTrainers, so --fail-fast has a trial of the broken source's own to stop at.
def test_max_hours_stops_launching_and_fail_fast_stops_at_the_first_failure(ray_cluster, tmp_path, capsys, monkeypatch):
    """One study, three runs: past max_hours (exit 3), --fail-fast (exit 1), then the default, where
    the source whose images are not images fails, is recorded, and the good source's runs complete.
    (One study for all of it: each pretraining run costs a TorchTrainer start-up.)"""
    from datasets_ import write_sharded_dataset

    rows = [
        (split, {"key": f"bad-{split}-{i}", "image": b"not a png", "label": i % 2, "caption": ""})
        for split, n in (("train", 80), ("test", 10))
        for i in range(n)
    ]
    write_sharded_dataset(tmp_path / "broken", "broken", ["a", "b"], rows)
    spec = {
        **SPEC,
        "study": "stops",
        "sources": {"broken": {"uri": str(tmp_path / "broken")}, "mnist": {"uri": "builtin:mnist"}},
        "pretrain": {
            **SPEC["pretrain"],
            "sweep": {"pretrain_size": [40], "label_noise": [0.0], "class_fraction": [0.5]},
            "pack": "off",  # one TorchTrainer trial per run: --fail-fast stops at the broken source's
        },
        "resources": {"workers": 1, "max_failures": 0, "max_concurrent_trials": 1},
        "budget": {"max_hours": 0.0003},
    }  # about 1 s: over before the first trial starts
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", str(study), "--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")]
    # The default cost model would refuse a 1 s budget up front; make it estimate nothing, so
    # the run-time stop is what is tested.
    for name in (
        "STARTUP_S",
        "PRETRAIN_OVERHEAD_S",
        "PRETRAIN_S_PER_SAMPLE_EPOCH",
        "TRANSFER_OVERHEAD_S",
        "FROZEN_FIT_S",
    ):
        monkeypatch.setattr(estimate, name, 0.0)
    client = MlflowClient(uri)
    broken, good = "supervised broken n=40 noise=0 classes=1", "supervised mnist n=40 noise=0 classes=5"

    assert main(argv) == 3
    captured = capsys.readouterr()
    assert "stopped: budget.max_hours (0.0003 h) reached; 2 trial(s) not launched" in captured.err
    assert f"resume with the same command: transferlab run {study}" in captured.err
    assert "[pretrain] phase over: 0 done, 0 failed, 2 not launched of 2 trials" in captured.out
    runs = _runs(client, "stops")
    assert {runs[n].info.status for n in (broken, good)} == {"KILLED"}
    assert runs["study stops"].info.status == "KILLED"
    assert runs["study stops"].data.metrics["pretrain_trials_not_launched"] == 2
    first_ids = {n: runs[n].info.run_id for n in (broken, good)}

    assert main([*argv, "--fail-fast", "budget.max_hours=100"]) == 1
    captured = capsys.readouterr()
    assert f"{broken}: FAILED" in captured.out
    assert "stopped at the first failed trial (--fail-fast)" in captured.err
    runs = _runs(client, "stops")
    assert runs[broken].info.status == "FAILED" and runs[good].info.status == "KILLED"
    assert {n: runs[n].info.run_id for n in (broken, good)} == first_ids
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert not [r for r in runs.values() if r.data.tags.get(TAG_KIND) == "transfer"]

    assert main([*argv, "budget.max_hours=100"]) == 1  # the broken source fails again, the rest runs
    captured = capsys.readouterr()
    out = captured.out
    assert f"{broken}: FAILED" in out
    assert f"1 trial(s) failed: {broken}" in captured.err
    runs = _runs(client, "stops")
    assert runs[broken].info.status == "FAILED"
    assert runs[good].info.status == "FINISHED" and runs[good].info.run_id == first_ids[good]
    # The class-filtered view is recorded with the run: its class mask and the kept classes.
    path = client.download_artifacts(runs[good].info.run_id, "view/class_mask.json", str(tmp_path))
    recorded = json.loads(open(path).read())
    assert recorded["classes"] == [str(i) for i in range(10)] and sum(recorded["included"]) == 5
    assert runs[good].data.params["kept_classes"] == ",".join(str(i) for i, k in enumerate(recorded["included"]) if k)
    assert runs["linear_probe digits 1-shot seed=0"].info.status == "FINISHED"
    assert runs["study stops"].info.status == "FAILED"
    assert runs["study stops"].data.metrics["failed_runs"] == 1
    assert "[pretrain] started" in out and "running 1" in out
    assert "done 1, running 0, failed 1 of 2" in out
    assert "[pretrain] phase over: 1 done, 1 failed of 2 trials" in out
    assert "[transfer] phase over: 1 done, 0 failed of 1 trials" in out
    m = runs["study stops"].data.metrics
    assert (
        m["pretrain_trials_done"],
        m["pretrain_trials_failed"],
        m["pretrain_trials_running"],
        m["pretrain_trials_total"],
    ) == (1, 1, 0, 2)
    assert (m["transfer_trials_done"], m["transfer_trials_total"]) == (1, 1)
    kinds = [r.data.tags[TAG_KIND] for r in runs.values()]
    assert kinds.count(KIND_STUDY) == 1 and kinds.count(KIND_PRETRAIN) == 2
    with capsys.disabled():  # shown with -s: the progress lines docs/planning.md quotes
        print("\n".join(line for line in out.splitlines() if line.startswith("[pretrain")))
