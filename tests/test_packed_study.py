"""A study whose small pretraining runs are packed (pretrain.pack: auto), end to end through the
CLI on a real local Ray and a real sqlite MLflow store."""

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_study import assert_checkpoints_are_logged_models

from orchestrator.cli import main
from orchestrator.records.schema import KIND_PRETRAIN, KIND_TRANSFER, TAG_CHECKPOINT, TAG_KIND
from trainers.pretrain import load_model

pytestmark = pytest.mark.timeout(900)

STUDY = {
    "study": "packed",
    "sources": {"mnist": {"uri": "builtin:mnist"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {
        "model": "tiny-cnn",
        "image_size": 16,
        "epochs": 2,
        "batch_size": 32,
        "sweep": {"pretrain_size": [200, 400], "label_noise": [0.0, 0.3]},
    },
    "transfer": {"protocol": ["linear_probe"], "shots": [1, "full"], "seeds": [0]},
    # One trial at a time: the four runs share one packed trial.
    "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
}


# Slow (~30 s): a real study (4 runs packed in one 2-epoch trial, 8 fits in 4 transfer trials), then its rerun; 2
# epochs are what the per-epoch records and the progress line's "epoch 2" check.
def test_a_packed_study_records_every_run_as_its_own(ray_cluster, tmp_path, capsys):
    from ray.train import Checkpoint

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", str(path), "--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")]
    assert main(["plan", str(path), "--tracking-uri", uri]) == 0
    assert "4 of them packed into 1 trial(s)" in capsys.readouterr().out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[pretrain-packed] phase over: 1 done, 0 failed of 1 trials" in out  # 4 runs, 1 trial
    assert "epoch 2: train_loss=" in out  # the progress line of the pack's reports

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("packed").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{KIND_PRETRAIN}'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    checkpoints = set()
    for r in runs:
        m = r.data.metrics
        assert sorted(x.step for x in client.get_metric_history(r.info.run_id, "train_loss")) == [0, 1]
        assert [x.step for x in client.get_metric_history(r.info.run_id, "upstream_accuracy")] == [1]
        # The step curve, every log_every_steps (default 10) of the run's ceil(2 epochs · n / 32) steps.
        steps = sorted(x.step for x in client.get_metric_history(r.info.run_id, "train_loss_step"))
        assert steps == list(range(10, -(-2 * int(r.data.params["pretrain_size"]) // 32) + 1, 10))
        assert 0.0 <= m["upstream_accuracy"] <= 1.0 and m["pack_size"] == 4 and m["trial_seconds"] > 0
        assert m["num_train_samples"] == int(r.data.params["pretrain_size"])
        checkpoints.add(r.data.tags[TAG_CHECKPOINT])
        with Checkpoint(r.data.tags[TAG_CHECKPOINT]).as_directory() as d:
            model = load_model(d)
        assert model.meta["config_hash"] == r.data.tags["transferlab.config_hash"] and model.head.out_features == 10
    assert len(checkpoints) == 4
    noisy = [r for r in runs if r.data.params["label_noise"] == "0.3"]
    assert all(0.2 < r.data.metrics["realized_label_noise"] < 0.4 for r in noisy)
    transfers = client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{KIND_TRANSFER}'")
    assert len(transfers) == 4 * 2 and {r.info.status for r in transfers} == {"FINISHED"}
    # Packed runs are logged models too, and each has the pack's system metrics.
    assert_checkpoints_are_logged_models(client, uri, runs, transfers)

    assert main(argv) == 0  # nothing left: no run is trained again
    assert "ran 0/4 pretraining runs and 0/8 transfer fits" in capsys.readouterr().out
