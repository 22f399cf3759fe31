"""Datamodel sweeps: stacked training equals training alone, the spec's errors, and one sweep end
to end on a real local Ray + sqlite MLflow with a planted signal (source and task are both
builtin:digits, so each source class duplicates one target class), then its counterfactual
follow-up planned, run and reported."""

import copy
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from datasets_.pipeline import decode_split, normalize
from orchestrator.analysis.counterfactual import SEEDS_PER_ARM, read_plan
from orchestrator.cli import main
from orchestrator.execution import datamodel_sweep
from orchestrator.planning.data_checks import resolve_data
from orchestrator.planning.datamodel_plan import INFLUENCE_FRACTION, build_datamodel_plan
from orchestrator.records.schema import (
    KIND_DATAMODEL_BATCH,
    KIND_DATAMODELS,
    KIND_STUDY,
    OUTPUTS_INFLUENCE_HOLDOUT,
    PARAM_OUTPUTS_SPLIT,
    TAG_DATAMODEL_TABLE,
    TAG_KIND,
    TAG_PARENT,
)
from orchestrator.records.tracker import Tracker
from orchestrator.spec import SpecError, load_spec, parse_spec
from tests.synthetic_runs import SyntheticStudy
from trainers.models import build_model, model_config
from trainers.pretrain import lr_at
from trainers.stacked import TrainSettings, index_stream, stacked_features, stacked_upstream_accuracy, train_stacked

STUDY = {
    "study": "dm",
    "sources": {"digits_src": {"uri": "builtin:digits"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {"model": "tiny-cnn", "image_size": 8, "epochs": 3, "batch_size": 32, "lr": 0.01},
    "datamodels": {
        "source": "digits_src",
        "task": "digits",
        "num_models": 24,
        "class_fraction": 0.5,
        "models_per_trial": 12,
    },
    "resources": {"cpus_per_worker": 1},
}


def _toy(n=240, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))
    return images, rng.integers(0, classes, n), np.array([f"k{i}" for i in range(n)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmapped", "in-turn"])
def test_a_stacked_model_trains_as_it_would_alone(vectorize):
    """Model 1 of a stack of 3 == the same model stacked alone == a plain loop with torch.optim.AdamW
    on its own index stream (its classes only, full batches, reshuffled per epoch from its seed),
    whether the stack's steps are vmapped (the accelerator's default) or run in turn (the CPU's)."""
    torch.set_num_threads(1)
    images, labels, keys = _toy()
    cfg, C = model_config("tiny-cnn"), 6
    masks = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 1]], dtype=bool)
    s = TrainSettings(image_size=8, epochs=1, batch_size=16, lr=0.01, weight_decay=5e-4)
    three = train_stacked(cfg, C, images, labels, keys, masks, [10, 11, 12], s, vectorize=vectorize)
    alone = train_stacked(cfg, C, images, labels, keys, masks[1:2], [11], s, vectorize=not vectorize)

    torch.manual_seed(11)
    net = build_model(cfg, C, 8).train()
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    stream = index_stream(np.argsort(keys), labels, masks[1], 16, 1, 11)
    assert set(labels[stream.ravel()]) <= {1, 2, 3}  # only its own classes
    for t, rows in enumerate(stream):
        for g in opt.param_groups:
            g["lr"] = lr_at(t / len(stream), s.lr, 1, 0.0, "cosine")
        loss = torch.nn.functional.cross_entropy(net(normalize(images[rows])), torch.from_numpy(labels[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = net.state_dict()
    for k in three.params:
        assert torch.allclose(three.params[k][1], alone.params[k][0], atol=1e-6), k
        assert torch.allclose(three.params[k][1], plain[k], rtol=1e-4, atol=1e-5), k
    for k in three.buffers:  # BatchNorm running statistics too
        assert torch.allclose(three.buffers[k][1].float(), plain[k].float(), rtol=1e-4, atol=1e-5), k
    # Models with fewer samples run fewer steps and then stay put; features match the module's.
    assert three.num_train_samples.tolist() == [int(np.isin(labels, np.flatnonzero(m)).sum()) for m in masks]
    x = normalize(images[:20])
    feats = stacked_features(three, images[:20])
    assert feats.shape == (3, 20, 16)
    one = three.model(1, C, cfg, 8)
    assert np.allclose(feats[1], one.backbone(x).detach().double().numpy(), atol=1e-5)
    # Upstream accuracy: each model's own module, scored on the held-out samples of its own classes.
    held_x, held_y = images[-40:], labels[-40:]
    up = stacked_upstream_accuracy(three, held_x, held_y, masks)
    for b in range(3):
        mine = np.isin(held_y, np.flatnonzero(masks[b]))
        pred = three.model(b, C, cfg, 8)(normalize(held_x)).argmax(1).numpy()
        assert up[b] == pytest.approx((pred[mine] == held_y[mine]).mean())
    assert np.isnan(stacked_upstream_accuracy(three, held_x, held_y, np.zeros_like(masks))).all()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"datamodels": {"class_fraction": 1.0}}, "datamodels.class_fraction: must be below 1"),
        ({"datamodels": {"task": "cifar"}}, "datamodels.task: unknown value 'cifar'"),
        ({"datamodels": {"models_per_trial": 0}}, "datamodels.models_per_trial: must be >= 1, got 0"),
        ({"datamodels": {"num_models": 1}}, "datamodels.num_models: must be >= 2, got 1"),
        ({"datamodels": {"protocol": "finetune"}}, "datamodels.protocol: unknown value 'finetune'"),
        ({"datamodels": {"modles": 3}}, "datamodels.modles: unknown key"),
        ({"pretrain": {"sweep": {"seed": [0, 1]}}}, "pretrain.sweep: a datamodels study draws its own class subsets"),
        ({"pretrain": {"method": "clip"}}, "pretrain.method: datamodel sweeps train supervised models only"),
    ],
)
def test_bad_datamodel_specs_name_the_field(change, field):
    doc = copy.deepcopy(STUDY)
    for section, values in change.items():
        doc[section] = {**doc[section], **values}
    with pytest.raises(SpecError) as e:
        parse_spec(doc)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


@pytest.mark.timeout(300)
def test_a_sweep_measures_influence_on_a_train_holdout_and_never_reads_test(tmp_path, monkeypatch):
    """Each model's probe fits on the task's train split less the influence holdout and is scored on
    the holdout (20% of the train split by key hash, the table's examples); the task's test split,
    which scores the counterfactual, is not read. Each model's upstream accuracy is measured on the
    source's test split."""
    spec = parse_spec(copy.deepcopy(STUDY))
    data = resolve_data(spec)
    plan = build_datamodel_plan(spec, data)
    read = []
    task = data["tasks.digits"]

    def recording(dataset, split, *args, **kwargs):
        read.append((dataset is task, split))
        return decode_split(dataset, split, *args, **kwargs)

    monkeypatch.setattr(datamodel_sweep, "decode_split", recording)
    rows = datamodel_sweep.train_and_probe(plan, data["sources.digits_src"], task, (0, 1)).to_pandas()
    assert (True, "test") not in read and plan.influence_fraction == INFLUENCE_FRACTION == 0.2

    datamodel_sweep.write_sweep_header(str(tmp_path / "table"), plan, task)
    ex = pq.read_table(tmp_path / "table" / "examples.parquet").to_pandas()
    train = task.keys_and_labels("train")
    assert (
        ex["key"].tolist() == train.keys[ex["example"]].tolist() and (ex["label"] == train.labels[ex["example"]]).all()
    )
    assert abs(len(ex) / len(train.keys) - 0.2) < 0.03 and ex["label"].nunique() == task.num_classes
    assert all(len(p) == len(ex) for p in rows["correct_prob"])
    # The margin (what influence is read from by default) is positive exactly where the probe is right.
    assert spec.datamodels.influence_on == "margin"
    for margin, pred in zip(rows["margin"], rows["prediction"]):
        right = pred == ex["label"].to_numpy()
        assert len(margin) == len(ex) and ((margin > 0) == right).all() and right.mean() > 0.5
    assert rows["upstream_accuracy"].between(0, 1).all()
    sweep = json.loads((tmp_path / "table" / "sweep.json").read_text())
    assert sweep[PARAM_OUTPUTS_SPLIT] == OUTPUTS_INFLUENCE_HOLDOUT
    assert plan.params(spec)[PARAM_OUTPUTS_SPLIT] == OUTPUTS_INFLUENCE_HOLDOUT


def _runs(client, kind):
    exp = client.get_experiment_by_name("dm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=1000)


# Slow (~30 s): a budget-stopped sweep, the sweep, its resume and a counterfactual follow-up study: each a real
# Ray phase.
@pytest.mark.timeout(900)
def test_datamodel_sweep_records_a_table_resumes_reports_planted_influence_and_plans_a_counterfactual(
    ray_cluster, tmp_path, capsys
):
    spec = tmp_path / "dm.yaml"
    spec.write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = ["run", str(spec), "--tracking-uri", uri, "--storage-path", str(tmp_path / "storage")]
    assert main(["validate", str(spec)]) == 0
    assert "datamodel sweep of 24 models" in capsys.readouterr().out
    # Past budget.max_hours no trial starts: exit 3 with the resume command, nothing in the table.
    assert main(run + ["budget.max_hours=0.0000001"]) == 3
    assert "stopped: budget.max_hours (1e-07 h) reached; 2 datamodel trial(s) not launched" in capsys.readouterr().err
    assert main(run) == 0

    client = MlflowClient(uri)
    (sweep,) = _runs(client, KIND_DATAMODELS)
    (study,) = _runs(client, KIND_STUDY)
    batches = _runs(client, KIND_DATAMODEL_BATCH)
    assert (
        sweep.data.tags[TAG_PARENT] == study.info.run_id and sweep.info.status == "FINISHED"
    )  # reopened, then finished
    assert [m.value for m in client.get_metric_history(sweep.info.run_id, "models_done")] == [0, 24]
    assert len(batches) == 2 and {b.data.tags[TAG_PARENT] for b in batches} == {sweep.info.run_id}
    assert sorted(b.data.metrics["models"] for b in batches) == [12, 12]
    assert sweep.data.metrics["models_done"] == 24 and sweep.data.params["models_per_trial"] == "12"
    table_dir = tmp_path / "storage" / "datamodels" / sweep.data.tags[TAG_DATAMODEL_TABLE].rsplit("/", 1)[1]
    parts = sorted((table_dir / "models").glob("*.parquet"))
    assert [p.name for p in parts] == ["models-000000-000011.parquet", "models-000012-000023.parquet"]
    t = pd.read_parquet(table_dir / "models").sort_values("model")
    assert t["model"].tolist() == list(range(24))
    masks = np.stack(t["mask"].to_numpy())
    assert masks.shape == (24, 10) and (masks.sum(1) == 5).all() and len({tuple(m) for m in masks}) > 20
    n_test = len(pq.read_table(table_dir / "examples.parquet"))
    assert all(len(x) == n_test for x in t["correct_prob"]) and t["accuracy"].between(0.5, 1.0).all()

    # Resume: the models of a lost part (as a killed trial leaves) are trained again, those of the
    # other part are not; a larger num_models extends the same sweep and table.
    parts[1].unlink()
    capsys.readouterr()
    assert main(run + ["datamodels.num_models=30"]) == 0
    out = capsys.readouterr().out
    assert "30/30 models" in out and "18 trained now, 12 already there" in out
    assert len(_runs(client, KIND_DATAMODELS)) == 1
    again = sorted(
        (int(b.data.params["first_model"]), int(b.data.params["last_model"]))
        for b in _runs(client, KIND_DATAMODEL_BATCH)
    )
    assert again == [(0, 11), (12, 23), (12, 23), (24, 29)]
    assert pd.read_parquet(table_dir / "models")["model"].sort_values().tolist() == list(range(30))

    # The report computes influence from the table; each source class helps its own target class most.
    assert main(["report", "dm", "--tracking-uri", uri, "--out", str(tmp_path / "rep"), "--bootstrap", "0"]) == 0
    ranking = pd.read_csv(tmp_path / "rep" / "tables" / "class_ranking.csv")
    assert (ranking["models"] == 30).all() and len(ranking) == 10
    ex = pd.read_csv(tmp_path / "rep" / "tables" / "influence_per_example.csv")
    labels = pq.read_table(table_dir / "examples.parquet").to_pandas().set_index("example")["label"]
    ex["target"] = ex["example"].map(labels)
    per_target = ex.groupby(["target", "class"])["influence"].mean().unstack()
    assert (per_target.idxmax(axis=1) == per_target.index).sum() >= 9, per_target.round(3)
    numbers = json.loads((tmp_path / "rep" / "numbers.json").read_text())
    assert numbers["influence"]["digits/linear_probe/digits_src"]["output"] == "margin"
    # datamodels.influence_on (default margin): the report's per-example influence is mean(with) −
    # mean(without) of the table's margin column, recomputed here for every class.
    t30 = pd.read_parquet(table_dir / "models").sort_values("model")
    masks30, margins = np.stack(t30["mask"].to_numpy()), np.stack(t30["margin"].to_numpy()).astype(float)
    classes = json.loads((table_dir / "sweep.json").read_text())["classes"]
    for ci, name in enumerate(classes):
        want = margins[masks30[:, ci]].mean(0) - margins[~masks30[:, ci]].mean(0)
        got = ex[ex["class"].astype(str) == str(name)].sort_values("example")["influence"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    _counterfactual(spec, uri, tmp_path, capsys, study.info.run_id, ranking)


def _counterfactual(spec, uri, tmp_path, capsys, study_run_id, ranking):
    """The sweep's ranking plans an ordinary follow-up study (pretraining runs of the arms' sources,
    probed as the sweep probed), and the report of the sweep's study plots the follow-up's arms."""
    cf = ["counterfactual", "dm", "--spec", str(spec), "--tracking-uri", uri, "--remove-top"]
    capsys.readouterr()
    assert main(cf + ["1", "--task", "cifar"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --task: the datamodel sweep of study 'dm' has task 'digits', not 'cifar'"
    )
    assert main(cf + ["1", "--arms", "harmful", "--seeds", "1", "--out", str(tmp_path / "cf1")]) == 0
    small = tmp_path / "cf1" / "dm-counterfactual.yaml"
    sweep = load_spec(small).pretrain.sweep
    assert (sweep["source"], sweep["seed"]) == (("digits_src", "digits_src-harmful-k1"), (0,))
    capsys.readouterr()
    assert main(["validate", str(small)]) == 0  # its data too; running it costs ~15 s per pretraining run
    assert "2 pretraining runs, 2 transfer fits on 1 task(s)" in capsys.readouterr().out

    assert main(cf + ["1", "2", "--out", str(tmp_path / "cf")]) == 0
    printed = capsys.readouterr().out
    follow = load_spec(tmp_path / "cf" / "dm-counterfactual.yaml")
    arms = [f"digits_src-{arm}-k{k}" for arm in ("harmful", "helpful", "random") for k in (1, 2)]
    assert follow.datamodels is None and follow.pretrain.sweep["source"] == ("digits_src", *arms)
    assert follow.pretrain.sweep["seed"] == tuple(range(SEEDS_PER_ARM))  # every arm the same seeds: paired
    assert follow.pretrain.base == load_spec(spec).pretrain.base
    t = follow.transfer
    assert (t.protocol, t.shots, t.seeds, follow.transfer_tasks) == (("linear_probe",), ("full",), (0,), ("digits",))
    plan = json.loads((tmp_path / "cf" / "dm-counterfactual.plan.json").read_text())
    worst, best = str(ranking["class"].iloc[-1]), str(ranking["class"].iloc[0])  # the report's ranking
    assert plan["sources"]["digits_src-harmful-k1"]["removed_classes"] == [worst]
    assert follow.sources["digits_src-helpful-k1"].drop_classes == (best,)
    assert f"harmful K=1: drop {worst}  (source digits_src-harmful-k1)" in printed
    assert read_plan(Tracker(uri), study_run_id) == plan

    # The follow-up's runs, written as `transferlab run` writes them, with planted accuracies.
    runs = SyntheticStudy(uri, "dm-counterfactual", tmp_path / "artifacts")
    effect = {"baseline": 0.0, "harmful": 0.05, "helpful": -0.05, "random": 0.0}
    for source, info in plan["sources"].items():
        for seed in range(3):
            pre = runs.pretrain(source, "full", upstream=0.9, seed=seed, model="tiny-cnn")
            runs.transfer(pre, "digits", "full", 0, 0.6 + effect[info["arm"]] * info["k"] + 0.001 * seed)
    assert (
        main(["report", "dm", "--tracking-uri", uri, "--out", str(tmp_path / "rep2"), "--bootstrap", "0", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    numbers = report["counterfactual"]
    got = {(r["arm"], r["k"]): r["mean"] for r in numbers["arms"]}
    assert numbers["followup_study"] == "dm-counterfactual" and len(got) == 9
    assert got[("harmful", 2)] == pytest.approx(0.701) and got[("helpful", 1)] == pytest.approx(0.551)
    assert got[("random", 0)] == got[("harmful", 0)] == pytest.approx(0.601)
    assert (tmp_path / "rep2" / "figures" / "counterfactual.png").exists()
    # No claims declared: the default counterfactual_removal claims, each arm paired by seed (3 seeds).
    judged = {r["claim"]: r["verdict"] for r in report["claims_overall"]}
    assert judged == {
        f"counterfactual_removal (arm={arm}{versus})": "reproduced"
        for arm in ("harmful", "helpful")
        for versus in ("", ", versus=random")
    }
