"""The analysis on MLflow runs written here with planted ground truth: fits, multipliers, influence,
the report and the counterfactual plan, through the same code ``transferlab report`` runs."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.analysis import fits, influence, tables
from orchestrator.analysis.frame import influence_inputs, load_study
from orchestrator.cli import main
from orchestrator.records.schema import FAILED, RUNNING
from orchestrator.records.tracker import Tracker
from orchestrator.spec import load_spec
from tests.synthetic_runs import SyntheticStudy, per_example_frame

K, ALPHA, E_IR = 0.5, 1.5, 0.1  # planted e_DS = k·e_US^α + e_IR
CLASSES = [str(c) for c in range(10)]
HELPFUL, HARMFUL = "3", "7"


def planted_ds(us):
    return 1 - fits.saturation(1 - np.asarray(us), K, ALPHA, E_IR)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", root / "artifacts"


@pytest.fixture(scope="module")
def tracker(store):
    return Tracker(store[0])


@pytest.fixture(scope="module")
def saturating(store):
    """40 pretraining runs on the planted curve (tiny noise), two shots settings."""
    s = SyntheticStudy(*store[:1], "saturating", store[1])
    rng = np.random.default_rng(0)
    for i, us in enumerate(np.linspace(0.4, 0.95, 40)):
        pre = s.pretrain("src", 1000 * (i + 1), upstream=us, seed=i)
        for shots, offset in ((10, 0.0), (25, 0.02)):
            s.transfer(pre, "digits", shots, 0, planted_ds(us) + offset + rng.normal(0, 0.002))
    return s


@pytest.fixture(scope="module")
def cloud(store):
    """A frontier on the planted curve plus a noisy cloud far below it (Abnar et al.'s scatter)."""
    s = SyntheticStudy(*store[:1], "cloud", store[1])
    rng = np.random.default_rng(1)
    us = np.concatenate([np.linspace(0.3, 0.95, 25), rng.uniform(0.3, 0.95, 75)])
    gap = np.concatenate([np.zeros(25), rng.uniform(0.05, 0.35, 75)])
    for i, (u, g) in enumerate(zip(us, gap)):
        s.transfer(s.pretrain("src", 1000, upstream=u, seed=i), "digits", 10, 0, planted_ds(u) - g)
    return s


def curve(n, shift=1.0):
    """A saturating accuracy-vs-size curve; ``shift`` scales the data (curve(n, 4) = curve(4n))."""
    return 0.95 - 0.7 * (n * shift) ** -0.25


@pytest.fixture(scope="module")
def sizes_study(store):
    """Source 'big' is worth 4× as much data as 'small'; 40% label noise halves the data's worth."""
    s = SyntheticStudy(*store[:1], "sizes", store[1])
    rng = np.random.default_rng(2)
    for source, shift, noise in (("small", 1.0, 0.0), ("big", 4.0, 0.0), ("small", 0.5, 0.4)):
        for size in (1000, 2000, 4000, 8000, 16000, 32000):
            for seed in range(3):
                pre = s.pretrain(source, size, upstream=0.9, noise=noise, seed=seed)
                for shots in (5, 10):
                    s.transfer(
                        pre, "digits", shots, seed, curve(size, shift) - 0.05 * (shots == 5) + rng.normal(0, 0.002)
                    )
    return s


@pytest.fixture(scope="module")
def classes_study(store):
    """60 models on random halves of 10 classes; class 3 raises every example's probability, 7 lowers it."""
    s = SyntheticStudy(*store[:1], "classes", store[1])
    rng = np.random.default_rng(3)
    for m in range(60):
        included = np.zeros(10, dtype=bool)
        included[rng.permutation(10)[:5]] = True
        pre = s.pretrain("mnist", "full", upstream=0.9, seed=m, classes=CLASSES, included=included.tolist())
        p = 0.5 + 0.15 * included[int(HELPFUL)] - 0.15 * included[int(HARMFUL)] + rng.normal(0, 0.03, 20)
        s.transfer(pre, "digits", "full", 0, float(p.mean()), per_example=per_example_frame(p))
        s.transfer(pre, "digits", 10, 0, float(p.mean()) - 0.1)  # few-shot runs carry no outputs here
    return s


# ---------------------------------------------------------------------------------------------
# Abnar et al.


def test_saturation_fit_recovers_planted_parameters(saturating, tracker):
    points = tables.us_ds_points(load_study(tracker, "saturating").transfer)
    fitted, _ = tables.saturation_tables(points, n_boot=50, seed=0)
    for _, row in fitted[fitted["shots"] == "10"].iterrows():
        assert row["k"] == pytest.approx(K, abs=0.08), row["fit_on"]
        assert row["alpha"] == pytest.approx(ALPHA, abs=0.25), row["fit_on"]
        assert row["e_ir"] == pytest.approx(E_IR, abs=0.01), row["fit_on"]
    allp = fitted[(fitted["shots"] == "10") & (fitted["fit_on"] == "all_points")].iloc[0]
    assert allp["points"] == 40
    assert (
        E_IR - 0.005 < allp["e_ir_ci_low"] < E_IR + 0.005 and E_IR - 0.005 < allp["e_ir_ci_high"] < E_IR + 0.01
    )  # narrow, at the truth
    # 25 shots is the same curve 2 points better: the fit moves e_IR, not the shape
    e25 = fitted[(fitted["shots"] == "25") & (fitted["fit_on"] == "all_points")].iloc[0]["e_ir"]
    assert e25 == pytest.approx(E_IR - 0.02, abs=0.01)


def test_hull_fit_beats_all_points_on_heldout_frontier(cloud, tracker):
    points = tables.us_ds_points(load_study(tracker, "cloud").transfer)
    fitted, check = tables.saturation_tables(points, n_boot=20, seed=0)
    row = check.iloc[0]
    assert row["train_points"] == 80 and row["heldout_points"] == 20
    assert row["hull_rmse"] < 0.02
    assert row["hull_rmse"] < 0.5 * row["all_points_rmse"]
    hull = fitted[fitted["fit_on"] == "hull"].iloc[0]
    assert hull["e_ir"] == pytest.approx(E_IR, abs=0.03)
    assert (
        fitted[fitted["fit_on"] == "all_points"].iloc[0]["e_ir"] > hull["e_ir"]
    )  # the cloud drags the all-points fit down


def test_upper_hull_is_the_nondecreasing_frontier():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0.2, 0.5, 0.3, 0.7, 0.75, 0.4])
    assert fits.upper_hull(x, y).tolist() == [0, 1, 3, 4]


# ---------------------------------------------------------------------------------------------
# Entezari et al.


def test_data_multiplier_matches_planted_one(sizes_study, tracker):
    t = load_study(tracker, "sizes").transfer
    mult = tables.multiplier_table(t, n_boot=100, seed=0)
    row = mult[(mult["source_a"] == "small") & (mult["source_b"] == "big") & (mult["shots"] == "10")].iloc[0]
    assert row["multiplier"] == pytest.approx(4.0, rel=0.1)
    # the CI brackets the planted multiplier, up to interpolation error (log-linear between sizes)
    assert 3.6 < row["ci_low"] <= 4.05 and 4.0 <= row["ci_high"] < 5.0
    back = mult[(mult["source_a"] == "big") & (mult["source_b"] == "small") & (mult["shots"] == "10")].iloc[0]
    assert back["multiplier"] == pytest.approx(0.25, rel=0.1)


def test_iso_accuracy_finds_two_noisy_samples_per_clean_one(sizes_study, tracker):
    iso = tables.iso_accuracy_table(load_study(tracker, "sizes").transfer)
    small = iso[(iso["source"] == "small") & (iso["shots"] == "10") & (iso["label_noise"] == 0.4)].dropna()
    assert len(small) >= 4  # the largest clean sizes are out of the noisy curve's reach
    assert np.median(small["noisy_per_clean"]) == pytest.approx(2.0, rel=0.05)
    assert small["noisy_per_clean"].between(1.6, 2.4).all()


def test_seed_aggregates_are_mean_and_t_interval():
    m, half, n = fits.mean_ci([0.5, 0.6, 0.7])
    assert (m, n) == (pytest.approx(0.6), 3)
    assert half == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3)
    assert np.isnan(fits.mean_ci([0.5])[1])


def test_size_to_reach_interpolates_in_log_size_and_never_extrapolates():
    assert fits.size_to_reach([100, 10000], [0.5, 0.7], 0.6) == pytest.approx(1000)
    assert np.isnan(fits.size_to_reach([100, 10000], [0.5, 0.7], 0.8))


# ---------------------------------------------------------------------------------------------
# Jain et al.


def test_influence_recovers_planted_helpful_and_harmful_class(classes_study, tracker):
    x = influence_inputs(load_study(tracker, "classes"), "digits", "linear_probe")
    assert x.shots == "full" and x.masks.shape == (60, 10) and x.outputs.shape == (60, 20)
    rank = influence.ranking(x.classes, influence.task_influence(x.masks, x.outputs))
    assert rank.iloc[0]["class"] == HELPFUL and rank.iloc[-1]["class"] == HARMFUL
    top, bottom = rank.iloc[0], rank.iloc[-1]
    assert (
        abs(top["influence"] - 0.15) < 3 * top["se"] + 0.02
        and abs(bottom["influence"] + 0.15) < 3 * bottom["se"] + 0.02
    )
    neutral = rank[~rank["class"].isin([HELPFUL, HARMFUL])]
    assert (neutral["influence"].abs() < 0.06).all()
    per_example = influence.influence(x.masks, x.outputs)
    assert (per_example.values[int(HELPFUL)] > 0.05).all()  # every example is helped
    rel = influence.split_half_reliability(x.masks, x.outputs, seed=0).iloc[0]
    assert rel["models"] == 60 and rel["splits"] == influence.SPLITS and rel["reliability"] > 0.8, rel
    perm = influence.permutation_test(x.masks, x.outputs, permutations=199, seed=0)
    assert (perm.p_family[[int(HELPFUL), int(HARMFUL)]] < 0.01).all()  # every example, family-wise
    top = perm.class_summary(x.classes).iloc[0]
    assert top["class"] == HELPFUL and top["top_examples"] == 20 and top["top_examples_null"] < 5
    assert top["found_examples"] == 20 and top["min_p_family"] == pytest.approx(1 / 200)  # 199 permutations


def test_influence_handles_missing_outputs_and_constant_classes():
    masks = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=bool)
    out = np.array([[1.0, np.nan], [0.0, 0.5], [1.0, 0.7], [0.0, 0.4]])
    inf = influence.influence(masks, out)
    assert np.isnan(inf.values[0]).all()  # every model saw class 0: no contrast
    assert inf.values[1].tolist() == pytest.approx([1.0, 0.7 - 0.45])


# ---------------------------------------------------------------------------------------------
# The commands


def test_report_command_writes_html_csv_json_and_logs_artifacts(sizes_study, store, tmp_path, capsys):
    # a run still going and one failed: the report says partial
    pre = sizes_study.pretrain("small", 64000, upstream=0.9, seed=9, status=RUNNING)
    sizes_study.transfer(sizes_study.pretrain("big", 64000, upstream=0.9, seed=9), "digits", 10, 0, 0.5, status=FAILED)
    assert pre
    out = tmp_path / "rep"
    assert main(["report", "sizes", "--tracking-uri", store[0], "--out", str(out), "--json", "--bootstrap", "20"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["partial"] is True and numbers["status"]["pretrain"]["RUNNING"] == 1
    assert {r["source_a"] for r in numbers["data_multiplier"]} == {"small", "big"}
    # no claims declared: the kinds that apply to the grid are judged, each row with its interval and n
    keys = {"claim", "setting", "statistic", "estimate", "ci_low", "ci_high", "n", "verdict"}
    assert numbers["claims"] and all(keys <= set(r) for r in numbers["claims"])
    assert {r["claim"] for r in numbers["claims"]} == {r["claim"] for r in numbers["claims_overall"]}
    noisy = [r for r in numbers["claims"] if r["claim"] == "noisy_larger_noninferior"]
    assert noisy and all(r["n"] == 3 for r in noisy)  # three pretraining seeds per configuration
    html = (out / "report.html").read_text()
    assert "Claims" in html and "claims_overall" in html
    assert "Partial results" in html and "data:image/png;base64," in html
    assert "n</th>" in html  # every aggregate table says how many runs each mean is over
    assert (out / "tables" / "data_multiplier.csv").exists() and (out / "tables" / "saturation_fits.csv").exists()
    assert len(list((out / "figures").glob("*.png"))) >= 4
    client = Tracker(store[0]).client
    logged = {f.path for f in client.list_artifacts(sizes_study.study_run, "report")}
    assert {"report/report.html", "report/numbers.json", "report/tables", "report/figures"} <= logged


def test_report_command_rejects_unknown_and_empty_studies(store, capsys):
    assert main(["report", "nope", "--tracking-uri", store[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: study: no study named 'nope' in {store[0]}"]
    Tracker(store[0]).client.create_experiment("empty")
    assert main(["report", "empty", "--tracking-uri", store[0]]) == 2
    assert capsys.readouterr().err.strip() == "error: study: study 'empty' has no pretraining or transfer runs yet"


def test_counterfactual_plans_a_valid_followup_and_report_plots_the_arms(classes_study, store, tmp_path, capsys):
    spec_file = tmp_path / "classes.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "study": "classes",
                "sources": {"mnist": {"uri": "builtin:mnist"}},
                "tasks": {"digits": {"uri": "builtin:digits"}},
                "pretrain": {"sweep": {"source": ["mnist"], "class_fraction": [0.5], "seed": [0, 1, 2]}},
                "transfer": {"shots": [10, "full"]},
            }
        )
    )
    out = tmp_path / "cf"
    assert (
        main(
            [
                "counterfactual",
                "classes",
                "--spec",
                str(spec_file),
                "--remove-top",
                "1",
                "--seeds",
                "2",
                "--name",
                "two-seeds",
                "--tracking-uri",
                store[0],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_spec(out / "two-seeds.yaml").pretrain.sweep["seed"] == (0, 1)
    assert (
        main(
            [
                "counterfactual",
                "classes",
                "--spec",
                str(spec_file),
                "--remove-top",
                "1",
                "2",
                "--tracking-uri",
                store[0],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    spec = load_spec(out / "classes-counterfactual.yaml")
    assert spec.pretrain.sweep["seed"] == (0, 1, 2)  # the study's own seeds
    assert spec.sources["mnist-harmful-k1"].drop_classes == (HARMFUL,)
    assert spec.sources["mnist-helpful-k1"].drop_classes == (HELPFUL,)
    assert set(spec.sources["mnist-harmful-k2"].drop_classes) > {HARMFUL}
    assert len(spec.sources["mnist-random-k2"].drop_classes) == 2 and spec.sources["mnist"].drop_classes == ()
    assert "class_fraction" not in spec.raw["pretrain"]["sweep"]
    assert "harmful K=1: drop 7" in capsys.readouterr().out
    plan = json.loads((out / "classes-counterfactual.plan.json").read_text())
    assert plan["sources"]["mnist-harmful-k2"] == {
        "arm": "harmful",
        "k": 2,
        "removed_classes": spec.raw["sources"]["mnist-harmful-k2"]["drop_classes"],
    }

    # the follow-up "ran": removing harmful classes helps, helpful ones hurt
    follow = SyntheticStudy(store[0], "classes-counterfactual", store[1])
    effect = {"baseline": 0.0, "harmful": 0.05, "helpful": -0.05, "random": 0.0}
    for source, info in plan["sources"].items():
        for seed in range(3):
            pre = follow.pretrain(source, "full", upstream=0.9, seed=seed)
            follow.transfer(pre, "digits", "full", 0, 0.6 + effect[info["arm"]] * info["k"] + 0.001 * seed)
    rep = tmp_path / "rep"
    assert (
        main(["report", "classes", "--tracking-uri", store[0], "--out", str(rep), "--json", "--bootstrap", "10"]) == 0
    )
    arms = {(r["arm"], r["k"]): r["mean"] for r in json.loads(capsys.readouterr().out)["counterfactual"]["arms"]}
    assert arms[("harmful", 2)] == pytest.approx(0.701) and arms[("helpful", 2)] == pytest.approx(0.501)
    assert arms[("random", 0)] == arms[("harmful", 0)] == pytest.approx(0.601)
    assert (rep / "figures" / "counterfactual.png").exists()
    # Every example found family-wise belongs to the planted classes: all 20 of each, no other class.
    found = pd.read_csv(rep / "tables" / "influence_found_examples.csv", dtype={"class": str})
    assert found.groupby("class").size().to_dict() == {HELPFUL: 20, HARMFUL: 20}
    assert (found["p_family"] < 0.01).all() and (
        np.sign(found["influence"]) == found["class"].map({HELPFUL: 1, HARMFUL: -1})
    ).all()


def test_counterfactual_rejects_bad_k(classes_study, store, tmp_path, capsys):
    spec_file = tmp_path / "classes.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {"study": "classes", "sources": {"mnist": "builtin:mnist"}, "tasks": {"digits": "builtin:digits"}}
        )
    )
    assert (
        main(
            [
                "counterfactual",
                "classes",
                "--spec",
                str(spec_file),
                "--remove-top",
                "10",
                "--tracking-uri",
                store[0],
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == "error: --remove-top: K must be in 1..9 (classes with an influence estimate), got 10"
    )
    assert (
        main(
            [
                "counterfactual",
                "classes",
                "--spec",
                str(spec_file),
                "--remove-top",
                "1",
                "--seeds",
                "0",
                "--tracking-uri",
                store[0],
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == "error: --seeds: must be >= 1, got 0"
