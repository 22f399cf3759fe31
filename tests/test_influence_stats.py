"""Calibration of the influence and counterfactual statistics on simulated studies with a known truth.

Models train on random halves of the source's classes, as a datamodel sweep's do; their outputs
on the target examples are simulated: no class matters (null), or one class's presence raises
some examples' outputs by a stated amount (planted). Each check is a rate over simulated
studies, asserted within its binomial tolerance (three standard errors, or the 0.999 quantile).
numpy only, no MLflow.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator.analysis.counterfactual import (
    BASELINE,
    PAIRED_COLUMNS,
    arm_runs,
    paired_arm_differences,
)
from orchestrator.analysis.influence import permutation_test, split_half_reliability, task_influence
from orchestrator.analysis.stats import INCONCLUSIVE, MIN_UNITS, TOO_FEW

pytestmark = pytest.mark.timeout(120)

CLASSES = 10
NOISE = 0.1  # per-example output noise (SD), on the scale of a correct-class probability


def _masks(rng, models: int, classes: int = CLASSES) -> np.ndarray:
    """Each model on a random half of the classes (exactly half, as ``class_fraction: 0.5`` gives)."""
    order = np.argsort(rng.random((models, classes)), axis=1)
    m = np.zeros((models, classes), dtype=bool)
    np.put_along_axis(m, order[:, : classes // 2], True, axis=1)
    return m


def _outputs(rng, masks, examples: int, planted: dict | None = None) -> np.ndarray:
    """Outputs around 0.5: a per-model level shared by every example (some models are better), plus
    per-example noise, plus ``planted`` {class: (examples it raises, by how much)}."""
    y = 0.5 + rng.normal(0, 0.05, (len(masks), 1)) + rng.normal(0, NOISE, (len(masks), examples))
    for c, (cols, delta) in (planted or {}).items():
        y[:, cols] += delta * masks[:, [c]]
    return y


def _binomial_high(n: int, p: float) -> int:
    return int(stats.binom.ppf(0.999, n, p))


def test_permutation_p_values_are_calibrated_under_the_null():
    """No class matters: P(p ≤ 0.05) is 0.05 per (class, example), and the family-wise p-value
    calls any pair of a study at most 5% of the time."""
    rng = np.random.default_rng(0)
    studies, models, examples, alpha = 40, 100, 30, 0.05
    rates, family_hits = [], 0
    for s in range(studies):
        m = _masks(rng, models)
        y = 0.5 + rng.normal(0, NOISE, (models, examples))
        t = permutation_test(m, y, permutations=199, seed=s)
        rates.append((t.p <= alpha).mean())
        family_hits += int((t.p_family <= alpha).any())
    # The pairs of one study share its permutations, so the tolerance comes from the spread of the
    # studies' rates rather than from a binomial over all pairs.
    assert abs(np.mean(rates) - alpha) < 3 * np.std(rates, ddof=1) / np.sqrt(studies), np.mean(rates)
    assert family_hits <= _binomial_high(studies, alpha), family_hits


def test_a_planted_class_is_found_per_example():
    """Class 0 raises 20 of 40 examples by 0.05 (half the per-example noise SD) across 500 models:
    each of those examples at permutation p < 0.01, no other (class, example) pair beyond the
    test's 1%, and class 0 is the top influencer of more examples than the null allows."""
    rng = np.random.default_rng(1)
    studies, models, examples, delta = 5, 500, 40, 0.05
    raised = np.zeros((CLASSES, examples), dtype=bool)
    raised[0, :20] = True
    found, false, family, top_p = [], [], [], []
    for s in range(studies):
        m = _masks(rng, models)
        t = permutation_test(m, _outputs(rng, m, examples, {0: (raised[0], delta)}), permutations=499, seed=s)
        found.append(t.p[raised] < 0.01)
        false.append(t.p[~raised] < 0.01)
        family.append(t.p_family[raised] < 0.05)
        summary = t.class_summary(list(range(CLASSES))).set_index("class")
        top_p.append(summary.loc[0, "p"])
        # found_examples: the examples a class is significant on family-wise (p_family < 0.01)
        assert summary.loc[0, "found_examples"] == (t.p_family[0] < 0.01).sum()
        assert summary.drop(index=0)["found_examples"].sum() == (t.p_family[1:] < 0.01).sum() <= 1
        assert t.influence[raised].mean() == pytest.approx(delta, abs=0.02)
    # z ≈ 0.05 / (√(0.05² + 0.1²) · √(4/500)) ≈ 5.0: power at two-sided 0.01 about 0.99.
    assert np.mean(found) >= 0.9, np.mean(found)
    false = np.concatenate(false)
    assert false.sum() <= _binomial_high(len(false), 0.01), false.mean()
    assert np.mean(family) >= 0.5, np.mean(family)  # family-wise over 400 pairs: harder, still most
    # Topping a quarter of the examples is not enough: the per-model level every example shares makes
    # one class top many examples by chance (p 0.02–0.1 in this design); half of them is.
    assert max(top_p) < 0.05, top_p


def test_split_half_reliability_is_zero_under_the_null_and_high_with_planted_effects():
    """Pure noise: the halves' class influences are uncorrelated (reliability ≈ 0), where a nested
    check (a half of the models against all of them, which contain it) reads √(1/2) ≈ 0.71.
    Three of 20 classes with real effects on the task: the reliability their size predicts (≈ 0.79)."""
    rng = np.random.default_rng(2)
    null_r, nested, planted = [], [], []
    for s in range(30):
        m = _masks(rng, 200, classes=20)
        y = _outputs(rng, m, 20)
        null_r.append(split_half_reliability(m, y, splits=20, seed=s).iloc[0]["half_r"])
        full = task_influence(m, y).values[:, 0]
        half = task_influence(m[:100], y[:100]).values[:, 0]
        nested.append(np.corrcoef(half, full)[0, 1])
        effects = {0: (slice(None), 0.04), 1: (slice(None), 0.03), 2: (slice(None), -0.04)}
        planted.append(split_half_reliability(m, _outputs(rng, m, 20, effects), splits=20, seed=s).iloc[0])
    assert abs(np.mean(null_r)) < 0.1, np.mean(null_r)
    assert np.mean(nested) == pytest.approx(np.sqrt(0.5), abs=0.1)
    planted = pd.DataFrame(planted)
    # Reliability = signal variance across classes / (signal + estimation noise): the three effects'
    # variance over 20 classes against the SE² of one influence, (0.05² + 0.1²/20) · 4/200.
    signal = np.var([0.04, 0.03, -0.04] + [0.0] * 17)
    expected = signal / (signal + (0.05**2 + NOISE**2 / 20) * 4 / 200)  # ≈ 0.79
    assert planted["reliability"].mean() == pytest.approx(expected, abs=0.05), planted["reliability"].describe()
    assert (planted["reliability_low"] <= planted["reliability"]).all()
    assert (planted["reliability"] <= planted["reliability_high"]).all()


def _arm_frame(rng, seeds: int, effects: dict[str, float]) -> pd.DataFrame:
    """Accuracies of a follow-up: a per-seed level shared by every arm (SD 0.03), the arm's true
    effect, and a little per-run noise (SD 0.01)."""
    level = 0.6 + rng.normal(0, 0.03, seeds)
    rows = [(BASELINE, 0, s, level[s] + rng.normal(0, 0.01)) for s in range(seeds)]
    rows += [(arm, 2, s, level[s] + d + rng.normal(0, 0.01)) for arm, d in effects.items() for s in range(seeds)]
    return pd.DataFrame(rows, columns=["arm", "k", "seed", "accuracy"])


def test_paired_arm_differences_cover_the_true_difference():
    """16 seeds per arm: the 95% t-interval of the paired difference covers the true difference in
    95% of simulated follow-ups, and is narrower than the seed spread would allow unpaired."""
    rng = np.random.default_rng(3)
    truth = {"harmful": 0.01, "helpful": -0.02, "random": 0.0}
    sims = 400
    covered, width = [], []
    for _ in range(sims):
        d = paired_arm_differences(_arm_frame(rng, 16, truth))
        assert list(d.columns) == PAIRED_COLUMNS and len(d) == 4  # harmful, helpful × baseline, random
        want = np.array([truth["harmful"], truth["harmful"], truth["helpful"], truth["helpful"]])
        want -= np.array([0, truth["random"], 0, truth["random"]])
        covered.append((d["ci_low"] <= want) & (want <= d["ci_high"]))
        width.append(d["ci_high"] - d["ci_low"])
    rate = np.mean(np.concatenate(covered))
    assert abs(rate - 0.95) < 3 * np.sqrt(0.95 * 0.05 / sims), rate
    assert np.mean(np.concatenate(width)) < 0.02  # unpaired, the 0.03 seed SD alone gives ~0.04


def test_paired_arm_differences_verdicts_and_too_few_pairs():
    rng = np.random.default_rng(4)
    d = paired_arm_differences(_arm_frame(rng, 16, {"harmful": 0.05, "helpful": 0.05})).set_index("setting")
    harmful = d[d["claim"].str.contains("harmful")]
    helpful = d[d["claim"].str.contains("helpful")]
    assert harmful.loc["K=2, vs all classes", "verdict"] == "reproduced"
    assert helpful.loc["K=2, vs all classes", "verdict"] == "not reproduced"  # it raised accuracy instead
    few = paired_arm_differences(_arm_frame(rng, MIN_UNITS - 1, {"harmful": 0.05}))
    assert (few["verdict"] == INCONCLUSIVE).all() and (few["interval"] == TOO_FEW).all()
    assert few["ci_low"].isna().all() and (few["n"] == MIN_UNITS - 1).all()
    # Only seeds both arms have are paired.
    partial = _arm_frame(rng, 5, {"harmful": 0.05})
    partial = partial[~((partial["arm"] == BASELINE) & (partial["seed"] == 4))]
    assert paired_arm_differences(partial)["n"].tolist() == [4]


def test_arm_runs_reads_the_followup_transfer_frame():
    """One row per (arm, K, pretraining seed): the final layer at the largest shots, averaged over draws."""
    plan = {
        "task": "digits",
        "sources": {
            "src": {"arm": BASELINE, "k": 0, "removed_classes": []},
            "src-harmful-k1": {"arm": "harmful", "k": 1, "removed_classes": ["3"]},
        },
    }
    rows = []
    for source, acc in (("src", 0.6), ("src-harmful-k1", 0.7)):
        for seed in range(2):
            for draw in range(2):
                rows.append(("digits", source, "full", 1e9, "", seed, draw, acc + 0.01 * draw))
                rows.append(("digits", source, "10", 10, "", seed, draw, 0.1))  # fewer shots: not used
                rows.append(("digits", source, "full", 1e9, "block1", seed, draw, 0.2))  # earlier layer
    t = pd.DataFrame(rows, columns=["task", "source", "shots", "shots_n", "layer", "pretrain_seed", "seed", "accuracy"])
    got = arm_runs(t, plan)
    assert got.columns.tolist() == ["arm", "k", "seed", "accuracy"]
    assert got.set_index(["arm", "k", "seed"])["accuracy"].to_dict() == pytest.approx(
        {(BASELINE, 0, 0): 0.605, (BASELINE, 0, 1): 0.605, ("harmful", 1, 0): 0.705, ("harmful", 1, 1): 0.705}
    )
