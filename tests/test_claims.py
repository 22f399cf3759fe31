"""Claim verdicts (orchestrator.analysis.claims) on synthetic transfer frames with planted effects:
a planted effect is 'reproduced', its reverse 'not reproduced', no effect 'inconclusive', and too
few pretraining seeds 'inconclusive' with no interval. Calibration over many simulated studies:
tests/test_calibration.py."""

import itertools

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import claims, fits
from orchestrator.analysis.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from orchestrator.analysis.frame import InfluenceInputs
from orchestrator.analysis.stats import TOO_FEW
from orchestrator.spec.claims import default_claim


def frame(
    acc,
    sources=("a", "b"),
    sizes=(500, 4000),
    noises=(0.0,),
    shots=("1", "full"),
    layers=("",),
    seeds=8,
    pretrain_seeds=4,
    sd=0.01,
    task="t",
):
    """One row per transfer run; accuracy = acc(source, size, noise, shots, layer) + a pretraining-seed
    effect + N(0, sd); ``seeds`` few-shot draws, one fit at full."""
    rng = np.random.default_rng(0)
    rows = []
    for src, n, p in itertools.product(sources, sizes, noises):
        for ps in range(pretrain_seeds):
            run, a = f"{src}-{n}-{p}-{ps}", rng.normal(0, sd)
            for s, layer in itertools.product(shots, layers):
                for seed in range(1 if s == "full" else seeds):
                    rows.append(
                        {
                            "task": task,
                            "protocol": "linear_probe",
                            "source": src,
                            "method": "supervised",
                            "model": "small-cnn",
                            "shots": s,
                            "shots_n": np.inf if s == "full" else float(s),
                            "num_train_samples": float(n),
                            "label_noise": p,
                            "layer": layer,
                            "seed": seed,
                            "pretrain_run_id": run,
                            "pretrain_seed": ps,
                            "class_fraction": 1.0,
                            "upstream_accuracy": 0.9,
                            "accuracy": acc(src, n, p, s, layer) + a + rng.normal(0, sd),
                        }
                    )
    return pd.DataFrame(rows)


def test_verdicts_follow_the_interval_and_the_predicted_sign():
    assert claims.verdict(0.1, 0.3) == REPRODUCED and claims.verdict(-0.3, -0.1) == NOT_REPRODUCED
    assert claims.verdict(-0.1, 0.2) == INCONCLUSIVE and claims.verdict(float("nan"), 1) == INCONCLUSIVE
    assert claims.verdict(-0.3, -0.1, expect=-1) == REPRODUCED

    def rows(verdicts, ci=1.0):
        return pd.DataFrame({"verdict": verdicts, "ci_low": ci, "ci_high": ci})

    assert claims.summary(rows([REPRODUCED, REPRODUCED, INCONCLUSIVE])).startswith(f"{REPRODUCED} (2 of 3")
    assert claims.summary(rows([REPRODUCED, NOT_REPRODUCED, REPRODUCED])).startswith(INCONCLUSIVE)
    mixed = rows([REPRODUCED, REPRODUCED, INCONCLUSIVE]).assign(ci_low=[0.1, 0.2, np.nan])
    assert (
        claims.summary(mixed) == f"{REPRODUCED} (2 of 2 settings reproduced, 0 contradicted, 0 inconclusive; "
        "1 without an interval not counted)"
    )
    assert "point estimates" in claims.summary(rows([REPRODUCED], ci=np.nan))


@pytest.mark.parametrize(
    "few_gap, full_gap, expected", [(0.20, 0.02, REPRODUCED), (0.02, 0.20, NOT_REPRODUCED), (0.05, 0.05, INCONCLUSIVE)]
)
def test_source_advantage_is_signed(few_gap, full_gap, expected):
    t = frame(lambda src, n, p, s, layer: 0.6 + (few_gap if s == "1" else full_gap) * (src == "a"), sd=0.03)
    claim = default_claim("source_advantage", task="t", source="a", other="b")
    (row,) = claims.evaluate(t, [claim]).to_dict("records")
    assert row["verdict"] == expected and row["n"] == 4
    assert row["estimate"] == pytest.approx(few_gap - full_gap, abs=0.04)
    # the other way round, the same evidence with the opposite sign: no upward bias of a range
    (flip,) = claims.evaluate(t, [default_claim("source_advantage", task="t", source="b", other="a")]).to_dict(
        "records"
    )
    assert flip["estimate"] == pytest.approx(-row["estimate"])


def test_fewer_than_three_pretraining_seeds_are_too_few_to_judge():
    t = frame(lambda src, n, p, s, layer: 0.6 + 0.2 * (src == "a") * (s == "1"), pretrain_seeds=2)
    (row,) = claims.evaluate(t, [default_claim("source_advantage", task="t", source="a", other="b")]).to_dict("records")
    assert row["verdict"] == INCONCLUSIVE and np.isnan(row["ci_low"]) and row["n"] == 2
    assert row["interval"] == TOO_FEW and row["estimate"] == pytest.approx(0.2, abs=0.03)


def test_size_gain_at_few_shots_vs_full():
    t = frame(lambda src, n, p, s, layer: 0.5 + (0.15 if s == "1" else 0.02) * (n == 4000))
    out = claims.evaluate(t, [default_claim("size_helps_few_shot_more")])
    assert len(out) == 2 and set(out["verdict"]) == {REPRODUCED}
    assert set(out["interval"]) == {"t (paired by seed)"}  # nested subsets: seed i of each size paired
    assert out["estimate"].to_numpy() == pytest.approx([0.13, 0.13], abs=0.02)


def test_larger_noisy_set_is_non_inferior_within_the_margin():
    # Ten times the data gains 0.10; noise 0.2 costs 0.11 (−0.01: within a 0.02 margin), 0.4 costs 0.3.
    t = frame(
        lambda src, n, p, s, layer: 0.5 + 0.10 * (n == 4000) - {0.0: 0, 0.2: 0.11, 0.4: 0.3}[p],
        noises=(0.0, 0.2, 0.4),
        sources=("a",),
        sd=0.003,
    )
    out = claims.evaluate(t, [default_claim("noisy_larger_noninferior", margin=0.02)])
    assert list(out["verdict"]) == [REPRODUCED, NOT_REPRODUCED]  # noise 0.2, then 0.4
    assert out["estimate"].to_numpy() == pytest.approx([-0.01, -0.20], abs=0.01)
    strict = claims.evaluate(t, [default_claim("noisy_larger_noninferior", margin=0.0, label_noise=0.2)])
    assert list(strict["verdict"]) == [NOT_REPRODUCED]


def _saturating(e_ir, configs=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, e_us in enumerate(np.geomspace(0.04, 0.5, configs)):
        for ps in range(3):
            for d in range(3):
                acc = 1 - (0.8 * e_us**1.5 + e_ir) + rng.normal(0, 0.003)
                rows.append(
                    {
                        "task": "t",
                        "protocol": "linear_probe",
                        "source": "a",
                        "method": "supervised",
                        "model": "small-cnn",
                        "shots": "10",
                        "shots_n": 10.0,
                        "num_train_samples": 100.0 * (i + 1),
                        "label_noise": 0.0,
                        "layer": "",
                        "seed": d,
                        "pretrain_run_id": f"{i}-{ps}",
                        "pretrain_seed": ps,
                        "class_fraction": 1.0,
                        "upstream_accuracy": 1 - e_us,
                        "accuracy": acc,
                    }
                )
    return pd.DataFrame(rows)


def test_saturation_needs_e_ir_above_zero_not_at_a_bound():
    (sat,) = claims.evaluate(_saturating(0.1), [default_claim("saturation")]).to_dict("records")
    assert sat["verdict"] == REPRODUCED and sat["ci_low"] <= 0.1 <= sat["ci_high"]
    (none,) = claims.evaluate(_saturating(0.0), [default_claim("saturation")]).to_dict("records")
    assert none["verdict"] == INCONCLUSIVE and none["ci_low"] < 0 < none["ci_high"]  # 0 is inside, not a bound
    (few,) = claims.evaluate(_saturating(0.1, configs=4), [default_claim("saturation")]).to_dict("records")
    assert few["verdict"] == INCONCLUSIVE and "too few hull points" in few["interval"]


def test_batched_e_ir_fit_matches_the_profile_fit():
    rng = np.random.default_rng(3)
    e_us = np.geomspace(0.04, 0.5, 8)
    sets = [1 - (0.8 * e_us**1.5 + e_ir + rng.normal(0, 0.004, 8)) for e_ir in (0.0, 0.05, 0.2)]
    us = np.tile(1 - e_us, (3, 1))
    batch = fits.e_ir_batch(us, np.asarray(sets), np.ones((3, 8), bool))
    profile = [fits.e_ir_profile(1 - e_us, ds)["e_ir"] for ds in sets]
    assert batch == pytest.approx(profile, abs=2e-3)  # the profile's e_IR grid step is 7e-4
    few = np.zeros((3, 8), bool)
    few[:, :4] = True
    assert np.isnan(fits.e_ir_batch(us, np.asarray(sets), few)).all()  # under MIN_HULL_POINTS


def _two_shots(gap: float, seeds: int = 4, seed: int = 0) -> pd.DataFrame:
    """Configurations along e_DS = 0.8·e_US^1.5 + e_IR, e_IR 0.1 at full and 0.1 + ``gap`` at 10
    shots; each pretraining run's seed effect shared by both shots, as a checkpoint's is."""
    rng = np.random.default_rng(seed)
    out = []
    for shots, e_ir in (("10", 0.1 + gap), ("full", 0.1)):
        t = _saturating(e_ir, seed=seed).query("pretrain_seed == 0").drop(columns="seed")
        out.append(t.assign(shots=shots, shots_n=10.0 if shots == "10" else np.inf))
    t = pd.concat(out)
    runs = []
    for ps in range(seeds):
        effect = {run: rng.normal(0, 0.004) for run in t["pretrain_run_id"].unique()}
        runs.append(
            t.assign(
                pretrain_seed=ps,
                pretrain_run_id=t["pretrain_run_id"] + f"/{ps}",
                accuracy=t["accuracy"] + t["pretrain_run_id"].map(effect),
            )
        )
    draws = [pd.concat(runs).assign(seed=d) for d in range(3)]
    t = pd.concat(draws, ignore_index=True)
    t["accuracy"] += rng.normal(0, 0.002, len(t))
    return t


def test_e_ir_falls_with_shots_pairs_the_two_fits():
    claim = default_claim("e_ir_falls_with_shots")
    (row,) = claims.evaluate(_two_shots(0.1), [claim]).to_dict("records")
    assert row["verdict"] == REPRODUCED and row["interval"] == "paired bootstrap of runs + draws"
    assert row["ci_low"] <= 0.1 <= row["ci_high"] and row["estimate"] == pytest.approx(0.1, abs=0.02)
    (null,) = claims.evaluate(_two_shots(0.0, seed=1), [claim]).to_dict("records")
    assert null["verdict"] == INCONCLUSIVE and null["ci_low"] < 0 < null["ci_high"]
    (few,) = claims.evaluate(_two_shots(0.1, seeds=2), [claim]).to_dict("records")
    assert few["verdict"] == INCONCLUSIVE and few["interval"] == TOO_FEW and few["n"] == 2


def test_best_layer_with_the_layer_fixed_in_advance():
    def task(name, gap):
        return frame(
            lambda src, n, p, s, layer: 0.6 + (gap if layer == "block1" else 0.0),
            layers=("block1", "final"),
            task=name,
            shots=("1",),
            sizes=(500, 1000, 2000),
        )

    t = pd.concat([task("near", -0.2), task("far", -0.05)])
    claim = default_claim("best_layer_differs", near="near", far="far", layer="block1")
    (row,) = claims.evaluate(t, [claim]).to_dict("records")
    assert row["verdict"] == REPRODUCED and row["n"] == 6  # 2 sources x 3 sizes: configurations are the units
    assert row["estimate"] == pytest.approx(0.15, abs=0.01)


def _influence_inputs(effect: float, models: int = 120, seed: int = 0, classes=tuple("abcdef")):
    """Class-subset models (each class kept with probability 1/2) whose outputs on 30 examples rise
    by ``effect`` when class 'd' was in their data."""
    rng = np.random.default_rng(seed)
    masks = rng.random((models, len(classes))) < 0.5
    outputs = 0.5 + effect * masks[:, [3]] + rng.normal(0, 0.05, (models, 30))
    return InfluenceInputs("t", "linear_probe", "s", "full", list(classes), masks, outputs, np.arange(30))


def test_class_influence_reproduces_a_planted_class_and_not_a_null_one():
    claim = default_claim("class_influence", task="t", **{"class": "d"})
    (row,) = claims.evaluate(claims.Evidence(influence=(_influence_inputs(0.05),), permutations=99), [claim]).to_dict(
        "records"
    )
    assert row["verdict"] == REPRODUCED and row["interval"] == "t (Welch)"
    assert row["estimate"] == pytest.approx(0.05, abs=0.01) and row["n"] > 40  # the smaller group: models without d
    assert row["setting"].endswith("d ranks 1 of 6") and "permutation p = 0.01" in row["statistic"]
    (null,) = claims.evaluate(claims.Evidence(influence=(_influence_inputs(0.0),), permutations=99), [claim]).to_dict(
        "records"
    )
    assert null["verdict"] == INCONCLUSIVE and null["ci_low"] < 0 < null["ci_high"]
    harms = default_claim("class_influence", task="t", expect="negative", **{"class": "d"})
    (flip,) = claims.evaluate(claims.Evidence(influence=(_influence_inputs(0.05),), permutations=99), [harms]).to_dict(
        "records"
    )
    assert flip["verdict"] == NOT_REPRODUCED


def test_several_class_influence_claims_share_one_permutation_test():
    ev = claims.Evidence(influence=(_influence_inputs(0.05),), permutations=99)
    rows = [claims.class_influence(ev, default_claim("class_influence", task="t", **{"class": c}))[0] for c in "da"]
    assert len(ev.tested) == 1  # one input, one test, however many classes are claimed
    assert "permutation p = 0.01" in rows[0]["statistic"] and "ranks 1 of 6" in rows[0]["setting"]
    assert rows[1]["statistic"] != rows[0]["statistic"]  # each class reads its own line of the summary


def test_class_influence_on_a_class_the_source_lacks_is_inconclusive_and_says_so():
    claim = default_claim("class_influence", task="t", **{"class": "handwritten-7"})
    ev = claims.Evidence(influence=(_influence_inputs(0.05),), permutations=9)
    (row,) = claims.evaluate(ev, [claim]).to_dict("records")
    assert row["verdict"] == INCONCLUSIVE and row["interval"] == "'handwritten-7' is not a class of s"
    (none,) = claims.evaluate(claims.Evidence(), [claim]).to_dict("records")
    assert none["verdict"] == INCONCLUSIVE and none["interval"].startswith("no influence inputs")


def _arm_frame(gain: float, seeds: int = 6, sd: float = 0.01):
    """Per-seed accuracies of a follow-up: a shared per-seed level, harmful removal + ``gain``."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(seeds):
        level = 0.7 + rng.normal(0, 0.03)  # what seed s shares across arms: init and data order
        for arm, k, shift in (("baseline", 0, 0.0), ("harmful", 2, gain), ("helpful", 2, -gain), ("random", 2, 0.0)):
            rows.append({"arm": arm, "k": k, "seed": s, "accuracy": level + shift + rng.normal(0, sd)})
    return pd.DataFrame(rows)


def test_counterfactual_removal_is_judged_paired_by_seed():
    harmful = default_claim("counterfactual_removal", arm="harmful")
    helpful = default_claim("counterfactual_removal", arm="helpful", versus="random")
    assert helpful.expect == -1  # the default follows the arm
    out = claims.evaluate(claims.Evidence(arms=_arm_frame(0.03)), [harmful, helpful])
    assert list(out["setting"]) == ["K=2, vs all classes", "K=2, vs random K"]
    assert set(out["verdict"]) == {REPRODUCED} and set(out["interval"]) == {"t (paired by seed)"}
    null = claims.evaluate(claims.Evidence(arms=_arm_frame(0.0)), [harmful])
    assert list(null["verdict"]) == [INCONCLUSIVE]
    few = claims.evaluate(claims.Evidence(arms=_arm_frame(0.03, seeds=2)), [harmful])
    assert list(few["interval"]) == [TOO_FEW] and list(few["n"]) == [2]
    (missing,) = claims.evaluate(
        claims.Evidence(arms=_arm_frame(0.03)), [default_claim("counterfactual_removal", arm="harmful", k=9)]
    ).to_dict("records")
    assert missing["verdict"] == INCONCLUSIVE and "no runs of harmful K=9" in missing["interval"]


def test_default_claims_judge_the_planned_arms_and_never_a_class():
    names = [c.name for c in claims.default_claims(claims.Evidence(influence=(_influence_inputs(0.05),)))]
    assert names == []
    names = [c.name for c in claims.default_claims(claims.Evidence(arms=_arm_frame(0.03)))]
    assert names == [
        "counterfactual_removal (arm=harmful)",
        "counterfactual_removal (arm=harmful, versus=random)",
        "counterfactual_removal (arm=helpful)",
        "counterfactual_removal (arm=helpful, versus=random)",
    ]


def test_claims_on_clip_runs_that_did_not_learn_are_inconclusive():
    def acc(src, n, p, s, layer):  # source a helps few-shot, and more data helps it more
        return 0.5 + (0.2 if s == "1" else 0.02) * (src == "a") + (0.15 if s == "1" else 0.02) * (n == 4000)

    supervised = frame(acc)
    clip = supervised.assign(method="clip", pretrain_run_id="clip-" + supervised["pretrain_run_id"])
    # CLIP's zero-shot accuracy per pretraining run: source a's runs average 0.3 (< 0.5), b's 0.8.
    clip["upstream_accuracy"] = np.where(clip["source"] == "a", 0.2 + 0.2 * (clip["pretrain_seed"] % 2), 0.8)
    t = pd.concat([supervised, clip], ignore_index=True)
    asked = [
        default_claim("source_advantage", task="t", source="a", other="b"),
        default_claim("size_helps_few_shot_more"),
    ]
    rows = claims.evaluate(t, asked)
    verdicts = dict(zip(rows["setting"], zip(rows["verdict"], rows["interval"])))
    assert verdicts["t, supervised, linear_probe: a vs b"][0] == REPRODUCED
    assert verdicts["t, clip, linear_probe: a vs b"] == (
        INCONCLUSIVE,
        "CLIP did not learn: zero-shot upstream accuracy 0.30 (a) < 0.5",
    )
    assert verdicts["t ← a, clip, linear_probe"][0] == INCONCLUSIVE
    assert verdicts["t ← b, clip, linear_probe"][0] == REPRODUCED
    assert verdicts["t ← a, supervised, linear_probe"][0] == REPRODUCED
    # The statistic is still shown; only the verdict is withheld.
    gated = rows[rows["setting"] == "t, clip, linear_probe: a vs b"].iloc[0]
    assert gated["estimate"] == pytest.approx(0.18, abs=0.03)
    # Once CLIP learned on a as well, the same evidence is judged.
    t.loc[t["method"] == "clip", "upstream_accuracy"] = 0.7
    assert set(claims.evaluate(t, asked)["verdict"]) == {REPRODUCED}


def test_configurations_that_differ_in_width_epochs_or_head_decay_are_not_averaged_together():
    """A configuration is every pretraining setting but the seed: runs of one size and model but
    another width, epochs or head weight decay are separate hull points, and only the seeds of
    one configuration are averaged."""
    rows = []
    for i, (width, epochs, head, seed) in enumerate(
        itertools.product(["0.5", "2.0"], ["2", "6"], [None, "0.5"], [0, 1, 2])
    ):
        rows.append(
            {
                "method": "supervised",
                "source": "glyphs",
                "model": "tiny-cnn",
                "num_train_samples": 1000,
                "label_noise": 0.0,
                "width": width,
                "epochs": epochs,
                "head_weight_decay": head,
                "pretrain_seed": seed,
                "pretrain_run_id": f"r{i}",
                "upstream_accuracy": 0.1 * i,
                "accuracy": 0.5,
                "shots": 1,
                "seed": 0,
            }
        )
    points = claims.config_points(claims.prepare(pd.DataFrame(rows)))
    assert len(points) == 8 and set(points["seeds"]) == {3}
    assert sorted(points["us"].round(6)) == [round(0.1 * (3 * k + 1), 6) for k in range(8)]  # mean of 3 seeds


def _head_decay_frame(up_gain: float, down_gain: float, seeds: int = 3) -> pd.DataFrame:
    """Runs of 3 sizes x 2 head decays x seeds; the high decay moves upstream and downstream
    accuracy by the given gains plus seed noise."""
    rng = np.random.default_rng(0)
    rows = []
    for size, seed in itertools.product([1000, 2000, 4000], range(seeds)):
        base_up, base_down = 0.5 + size / 10_000, 0.4 + size / 20_000
        for i, head in enumerate(["0.0", "1.0"]):
            run = f"{size}-{seed}-{head}"
            up = base_up + i * up_gain + rng.normal(0, 0.01)
            for task, draw in itertools.product(["letters", "digits"], range(3)):
                rows.append(
                    {
                        **{"method": "supervised", "source": "glyphs", "model": "tiny-cnn", "label_noise": 0.0},
                        **{"num_train_samples": size, "width": "1.0", "epochs": "4", "head_weight_decay": head},
                        **{"pretrain_seed": seed, "pretrain_run_id": run, "upstream_accuracy": up},
                        **{"task": task, "shots": 1, "shots_n": 1.0, "seed": draw, "layer": ""},
                        "accuracy": base_down + i * down_gain + rng.normal(0, 0.01),
                    }
                )
    return pd.DataFrame(rows)


def test_head_decay_disagreement_pairs_runs_by_configuration_and_seed():
    from orchestrator.spec.claims import ClaimSpec

    c = ClaimSpec("head_decay_disagreement", "head", (("low", 0.0), ("high", 1.0), ("task", None), ("shots", None)))
    rows = claims.evaluate(_head_decay_frame(0.05, -0.05), [c])
    assert list(rows["setting"]) == ["upstream, head decay 1 vs 0", "digits, 1 shot(s)", "letters, 1 shot(s)"]
    assert set(rows["verdict"]) == {REPRODUCED} and set(rows["n"]) == {9}  # 3 sizes x 3 seeds
    assert rows["estimate"].iloc[0] == pytest.approx(0.05, abs=0.02)
    null = claims.evaluate(_head_decay_frame(0.05, +0.05), [c])
    assert list(null["verdict"][1:]) == [NOT_REPRODUCED, NOT_REPRODUCED]  # downstream rises too
    two_pairs = _head_decay_frame(0.05, -0.05, seeds=2).query("num_train_samples == 1000")
    assert set(claims.evaluate(two_pairs, [c])["verdict"]) == {INCONCLUSIVE}  # fewer than 3 pairs


def test_protocols_are_judged_apart_and_fine_tuning_a_subset_leaves_the_rest_to_the_probes():
    """A study that probes every model and fine-tunes only the clean ones (transfer.finetune.only):
    each protocol gets its own rows, never a mean over both, and a claim the fine-tuned subset cannot
    speak to (label noise) is judged on the probes alone."""

    def probe(src, n, p, s, layer):  # source a helps few-shot when probed
        return 0.6 + 0.2 * (src == "a") * (s == "1") - 0.05 * p

    def tuned(src, n, p, s, layer):  # ... and hurts when fine-tuned
        return 0.7 - 0.2 * (src == "a") * (s == "1")

    lp = frame(probe, noises=(0.0, 0.4))
    ft = frame(tuned).assign(protocol="finetune")
    rows = claims.evaluate(
        pd.concat([lp, ft], ignore_index=True),
        [
            default_claim("source_advantage", task="t", source="a", other="b"),
            default_claim("noisy_larger_noninferior", source="a"),
        ],
    )
    verdicts = dict(zip(rows["setting"], rows["verdict"]))
    assert verdicts["t, supervised, linear_probe: a vs b"] == REPRODUCED
    assert verdicts["t, supervised, finetune: a vs b"] == NOT_REPRODUCED
    est = dict(zip(rows["setting"], rows["estimate"]))
    assert est["t, supervised, linear_probe: a vs b"] == pytest.approx(0.2, abs=0.02)
    noisy = rows[rows["claim"].str.startswith("noisy_larger_noninferior")]
    assert list(noisy["setting"]) == ["t ← a, supervised, linear_probe, 1 shot(s)"]
