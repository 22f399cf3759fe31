"""The three pretraining methods and every transfer protocol on a real local Ray and a real MLflow
store: a study of all of them, the feature cache across studies, 1 vs 2 workers, worker kill."""

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.execution.phase import PhaseContext
from orchestrator.execution.pretrain_phase import build_pretrain_trainer
from orchestrator.execution.study import publish_data
from orchestrator.planning.plan import build_plan
from orchestrator.records.schema import KIND_PRETRAIN, KIND_STUDY, KIND_TRANSFER, PER_EXAMPLE_ARTIFACT, TAG_KIND
from orchestrator.records.tracker import Tracker
from orchestrator.spec import Resources, parse_spec

pytestmark = pytest.mark.timeout(900)

ALL = {
    "study": "methods",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 1,
        "batch_size": 32,
        "sweep": {"method": ["supervised", "clip", "simclr"], "pretrain_size": [300]},
    },
    "transfer": {
        "protocol": ["linear_probe", "logistic", "finetune", "lp_ft", "zero_shot"],
        "shots": [2],
        "seeds": [0],
        "layers": ["block1", "final"],
        "finetune": {"steps": 10, "lr": [0.01]},
    },
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def _runs(client, study, kind):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=1000)


# Slow (~90 s, shared with the feature-cache test): 3 pretraining methods (3 packed trials) x 5 transfer protocols x 2
# layers, 19 fits in 3 transfer trials, in one study: every method and protocol once.
@pytest.fixture(scope="module")
def methods_study(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    (tmp / "all.yaml").write_text(yaml.safe_dump(ALL))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp / "storage")]
    assert main(["run", str(tmp / "all.yaml"), *common]) == 0
    return tmp, uri, common


# Its time is the methods_study fixture's (3 packed pretraining runs, 19 fits), shared with the feature-cache test.
def test_every_method_and_protocol_lands_in_mlflow_with_the_schema(methods_study):
    _, uri, _ = methods_study
    client = MlflowClient(uri)
    pretrains = _runs(client, "methods", KIND_PRETRAIN)
    transfers = _runs(client, "methods", KIND_TRANSFER)
    assert sorted(r.data.params["method"] for r in pretrains) == ["clip", "simclr", "supervised"]
    for r in pretrains:
        assert r.info.status == "FINISHED"
        assert 0.0 <= r.data.metrics["upstream_accuracy"] <= 1.0
        # The step curve of every method's (packed) run: 300 samples in batches of 32 are 10 steps,
        # logged every log_every_steps = 10.
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss_step")] == [10]
    # Per method: linear_probe and logistic at 2 layers, finetune, lp_ft; zero_shot for clip.
    assert len(transfers) == 3 * 6 + 1
    got = {(r.data.params["protocol"], r.data.params["layer"]) for r in transfers}
    assert got == {
        ("linear_probe", "block1"),
        ("linear_probe", "final"),
        ("logistic", "block1"),
        ("logistic", "final"),
        ("finetune", "final"),
        ("lp_ft", "final"),
        ("zero_shot", "final"),
    }
    by_id = {r.info.run_id: r.data.params["method"] for r in pretrains}
    zero_shot = [r for r in transfers if r.data.params["protocol"] == "zero_shot"]
    assert len(zero_shot) == 1 and by_id[zero_shot[0].data.tags["mlflow.parentRunId"]] == "clip"
    assert zero_shot[0].data.params["shots"] == "0"
    for r in transfers:
        assert r.info.status == "FINISHED"
        assert {"task", "protocol", "shots", "seed", "layer"} <= set(r.data.params)
        assert 0.0 <= r.data.metrics["accuracy"] <= 1.0 and 0.0 <= r.data.metrics["mean_per_class_accuracy"] <= 1.0
        if r.data.params["protocol"] in ("finetune", "lp_ft"):
            assert r.data.params["finetune_steps"] == "10" and r.data.metrics["learning_rate"] == 0.01
    # The per-example outputs of every run, zero_shot included: a row per test example (the same
    # examples in every run), consistent with the run's accuracy and mean per-class accuracy.
    keys = None
    for run in transfers:
        df = pd.read_parquet(client.download_artifacts(run.info.run_id, PER_EXAMPLE_ARTIFACT))
        assert df.columns.tolist() == ["example", "key", "label", "prediction", "correct_prob", "margin"]
        assert df["example"].tolist() == list(range(len(df))) and len(df) > 100
        keys = df["key"].tolist() if keys is None else keys
        assert df["key"].tolist() == keys
        correct = df["prediction"] == df["label"]
        assert correct.mean() == pytest.approx(run.data.metrics["accuracy"])
        per_class = correct.groupby(df["label"]).mean().mean()
        assert per_class == pytest.approx(run.data.metrics["mean_per_class_accuracy"])
        assert ((df["margin"] > 0) == correct).all()
        assert df["correct_prob"].between(0, 1).all()
    # The study run counts the feature work: per checkpoint, 2 layers extracted once.
    study = _runs(client, "methods", KIND_STUDY)[0]
    assert study.data.metrics["feature_extractions"] == 3 * 2
    assert study.data.metrics["feature_cache_hits"] == 0
    assert study.data.metrics["transfer_fits_run"] == 19


# Slow: a second real study (one packed run) is what proves the feature cache is read across studies.
def test_a_second_study_reads_features_from_the_cache(methods_study, capsys):
    tmp, uri, common = methods_study
    second = {**ALL, "study": "methods-again"}
    second["pretrain"] = {**ALL["pretrain"], "sweep": {"method": ["supervised"], "pretrain_size": [300]}}
    second["transfer"] = {**ALL["transfer"], "protocol": ["linear_probe", "logistic"], "shots": [2, 4]}
    (tmp / "again.yaml").write_text(yaml.safe_dump(second))
    assert main(["run", str(tmp / "again.yaml"), *common]) == 0
    # Pretraining is deterministic from its config (packed alone in both studies here), so the new
    # checkpoint has the same weights and both layers' features come from the first study's cache.
    assert "features: 0 extracted, 2 from cache" in capsys.readouterr().out
    study = _runs(MlflowClient(uri), "methods-again", KIND_STUDY)[0]
    assert study.data.metrics["feature_extractions"] == 0
    assert study.data.metrics["feature_cache_hits"] == 2
    assert study.data.metrics["transfer_fits_run"] == 2 * 2 * 2


def _fit_pretraining(workers: int, tmp, fault=None):
    """Pretrain the fixed tiny problem on `workers` workers; return (result, MLflow run id, uri)."""
    spec = parse_spec(
        {
            "study": f"workers-{workers}",
            "sources": {"mnist": {"uri": "builtin:mnist"}},
            "tasks": {"digits": {"uri": "builtin:digits"}},
            "pretrain": {
                "model": "tiny-cnn",
                "image_size": 16,
                "epochs": 3,
                "batch_size": 64,
                "lr": 0.005,
                "sweep": {"pretrain_size": [1000]},
            },
            "transfer": {"shots": [1]},
        }
    )
    plan = build_plan(spec)
    run = plan.pretrain_runs[0]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp = tracker.experiment_id(spec.study)
    run_id = tracker.create_run(exp, KIND_PRETRAIN, spec.study, run.run_name, run.config_hash, run.params)
    ctx = PhaseContext(
        study=spec.study,
        tracking_uri=uri,
        experiment_id=exp,
        storage_path=str(tmp / "storage"),
        resources=Resources(workers=workers, cpus_per_worker=1, max_failures=2),
        datasets=publish_data(plan, str(tmp / "storage")),
    )
    result = build_pretrain_trainer(run, ctx, run_id, fault).fit()
    return result, run_id, uri


# Slow (~190 s): two real TorchTrainer fits in a row (1 worker; then 2 workers whose rank 0 is killed in epoch 1 and
# whose group restarts from a checkpoint), each starting its own worker processes; the comparison needs both.
def test_two_workers_match_one_worker_and_survive_a_killed_worker(ray_cluster, tmp_path):
    one, _, _ = _fit_pretraining(1, tmp_path / "one")
    marker = tmp_path / "killed"
    two, run_id, uri = _fit_pretraining(2, tmp_path / "two", {"epoch": 1, "marker": str(marker)})
    # Rank 0 died in the middle of epoch 1; FailureConfig restarted the group from epoch 0's
    # checkpoint and the run finished all 3 epochs.
    assert marker.read_text() == "killed in epoch 1\n"
    assert two.error is None and two.metrics["epoch"] == 2
    # MLflow holds each epoch once, although epoch 1 started twice.
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    # The same global batch on 1 or 2 workers: the same result within tolerance.
    a, b = one.metrics["upstream_accuracy"], two.metrics["upstream_accuracy"]
    assert a > 0.3 and b > 0.3, (a, b)  # chance is 0.1
    assert abs(a - b) < 0.1, (a, b)
    assert abs(one.metrics["train_loss"] - two.metrics["train_loss"]) < 0.25 * one.metrics["train_loss"]
