"""``pretrain.sweep`` as a list of grids: the plan is the union of their points (each point once,
first grid first), errors name the grid, and overrides / counterfactual follow-ups reach every grid.
Pure spec and plan checks on builtin:digits: no Ray, no training."""

import copy
import json

import pandas as pd
import pytest
import yaml

from orchestrator.analysis.counterfactual import plan_followup
from orchestrator.cli import main
from orchestrator.planning.plan import build_plan
from orchestrator.spec import SpecError, parse_spec

pytestmark = pytest.mark.timeout(300)

SUPERVISED = {"method": ["supervised"], "pretrain_size": [100, 200], "label_noise": [0.0, 0.2, 0.4]}
SIMCLR = {"method": ["simclr"], "pretrain_size": [100, 200]}
STUDY = {
    "study": "grids",
    "sources": {"digits": {"uri": "builtin:digits"}},
    "tasks": {"digits": {"uri": "builtin:digits"}},
    "pretrain": {"model": "tiny-cnn", "image_size": 16, "epochs": 1, "sweep": [SUPERVISED, SIMCLR]},
    "transfer": {"protocol": ["linear_probe"], "shots": [1], "seeds": [0]},
}


def _study(sweep) -> dict:
    doc = copy.deepcopy(STUDY)
    doc["pretrain"]["sweep"] = copy.deepcopy(sweep)
    return doc


def _points(plan) -> list[tuple]:
    return [(j.settings.method, j.view.pretrain_size, j.view.label_noise) for j in plan.pretrain_runs]


def test_a_list_of_grids_plans_their_union_and_plan_counts_it(tmp_path, capsys):
    spec = parse_spec(_study([SUPERVISED, SIMCLR]))
    assert spec.pretrain.sweep["method"] == ("supervised", "simclr")
    assert spec.pretrain.sweep["label_noise"] == (0.0, 0.2, 0.4)  # every value a grid takes
    plan = build_plan(spec)
    supervised = [("supervised", n, q) for n in (100, 200) for q in (0.0, 0.2, 0.4)]
    assert _points(plan) == supervised + [("simclr", 100, 0.0), ("simclr", 200, 0.0)]
    assert len({j.run_name for j in plan.pretrain_runs}) == 8 and plan.num_transfer_fits == 8

    # an overlapping grid adds only its new point, after the others
    plan = build_plan(
        parse_spec(
            _study([SUPERVISED, SIMCLR, {"method": ["supervised"], "pretrain_size": [100], "label_noise": [0.0, 0.6]}])
        )
    )
    assert _points(plan) == supervised + [("simclr", 100, 0.0), ("simclr", 200, 0.0), ("supervised", 100, 0.6)]
    assert len({j.config_hash for j in plan.pretrain_runs}) == 9

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    assert main(["plan", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pretrain_jobs"], summary["pretrain_new"], summary["transfer_trials"]) == (8, 8, 8)
    # Every run is small enough to pack (pretrain.pack: auto): supervised and simclr packs, each
    # cut so the trial slots of this machine stay busy; no run is left to a TorchTrainer.
    assert summary["packed_runs"] == 8 and 2 <= summary["packs"] <= 8
    assert summary["pretrain_trials"] == summary["packs"]
    # an override of an axis reaches every grid
    assert main(["validate", str(path), "pretrain.sweep.seed=[0, 1]"]) == 0
    assert "16 pretraining runs, 16 transfer fits" in capsys.readouterr().out


def test_one_grid_in_a_list_plans_the_same_jobs_as_the_mapping():
    mapping = parse_spec(_study(SUPERVISED))
    listed = parse_spec(_study([SUPERVISED]))
    assert mapping.pretrain.grids == (mapping.pretrain.sweep,) and not mapping.pretrain.listed
    assert mapping.pretrain.sweep == listed.pretrain.sweep
    a, b = build_plan(mapping), build_plan(listed)
    assert [(j.config_hash, j.run_name) for j in a.pretrain_runs] == [
        (j.config_hash, j.run_name) for j in b.pretrain_runs
    ]
    assert len(a.pretrain_runs) == 6


@pytest.mark.parametrize(
    "sweep, message",
    [
        (
            [SUPERVISED, {**SIMCLR, "label_noise": [1.4]}],
            "pretrain.sweep[1].label_noise[0]: must be in [0, 1], got 1.4",
        ),
        ([SUPERVISED, {"sizes": [1]}], "pretrain.sweep[1].sizes: unknown key"),
        ([SUPERVISED, {"amp": ["none", "bf16"]}], "pretrain.sweep[1].amp[1]: bf16 mixed precision runs on CUDA only"),
        ([], "pretrain.sweep: must hold at least one grid (a mapping of axis -> values)"),
        ([3], "pretrain.sweep[0]: must be a mapping, got int"),
        ("mnist", "pretrain.sweep: must be a mapping of axis -> values or a list of them, got string"),
    ],
)
def test_a_bad_grid_is_named(sweep, message):
    with pytest.raises(SpecError) as e:
        parse_spec(_study(sweep))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_data_checks_name_the_grid_and_datamodels_refuse_grids(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study([SUPERVISED, {**SIMCLR, "pretrain_size": [100, 100_000]}])))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: pretrain.sweep[1].pretrain_size[1]: 100000 exceeds the ")
    doc = _study([SUPERVISED])
    doc["datamodels"] = {"source": "digits", "task": "digits", "num_models": 4}
    with pytest.raises(SpecError, match=r"^pretrain.sweep: a datamodels study draws its own class subsets"):
        parse_spec(doc)


def test_counterfactual_followup_gives_every_grid_every_source():
    spec = parse_spec(_study([{**SUPERVISED, "class_fraction": [0.5]}, SIMCLR]))
    ranking = pd.DataFrame({"class": [str(c) for c in range(10)], "influence": [float(c) for c in range(10)]})
    doc, _ = plan_followup(spec, "digits", ranking, [1], ["harmful"], "digits")
    sources = ["digits", "digits-harmful-k1"]
    assert [g.get("class_fraction") for g in doc["pretrain"]["sweep"]] == [None, None]
    assert [g["source"] for g in doc["pretrain"]["sweep"]] == [sources, sources]
    assert parse_spec(doc).pretrain.sweep["source"] == tuple(sources)
