"""Claim verdicts (orchestrator.analysis.claims) on synthetic transfer frames with planted effects:
a planted effect is 'reproduced', its reverse 'not reproduced', no effect 'inconclusive'."""

import itertools

import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import claims
from orchestrator.analysis.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def frame(
    acc,
    sources=("a", "b"),
    sizes=(500, 4000),
    noises=(0.0,),
    shots=("1", "full"),
    layers=("",),
    seeds=8,
    sd=0.01,
    task="t",
):
    """One row per transfer run; accuracy = acc(source, size, noise, shots, layer) + N(0, sd)."""
    rng = np.random.default_rng(0)
    rows = []
    for src, n, p, s, layer in itertools.product(sources, sizes, noises, shots, layers):
        run = f"{src}-{n}-{p}"
        for seed in range(1 if s == "full" else seeds):
            rows.append(
                {
                    "task": task,
                    "protocol": "linear_probe",
                    "source": src,
                    "method": "supervised",
                    "shots": s,
                    "shots_n": np.inf if s == "full" else float(s),
                    "num_train_samples": float(n),
                    "label_noise": p,
                    "layer": layer,
                    "seed": seed,
                    "pretrain_run_id": run,
                    "class_fraction": 1.0,
                    "accuracy": acc(src, n, p, s, layer) + rng.normal(0, sd),
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
def test_source_spread(few_gap, full_gap, expected):
    t = frame(lambda src, n, p, s, layer: 0.6 + (few_gap if s == "1" else full_gap) * (src == "a"), sd=0.03)
    (row,) = claims.source_spread(t).to_dict("records")
    assert row["verdict"] == expected
    assert row["estimate"] == pytest.approx(few_gap - full_gap, abs=0.03)


def test_size_gain_at_few_shots_vs_full():
    t = frame(lambda src, n, p, s, layer: 0.5 + (0.15 if s == "1" else 0.02) * (n == 4000))
    out = claims.size_helps_few_shot_more(t)
    assert len(out) == 2 and set(out["verdict"]) == {REPRODUCED}
    assert out["estimate"].to_numpy() == pytest.approx([0.13, 0.13], abs=0.02)


def test_larger_noisy_set_against_smaller_clean_one():
    # Noise 0.2 costs 0.03, ten times the data gains 0.10: the big noisy set wins; noise 0.4 costs 0.3: it loses.
    t = frame(
        lambda src, n, p, s, layer: 0.5 + 0.10 * (n == 4000) - {0.0: 0, 0.2: 0.03, 0.4: 0.3}[p],
        noises=(0.0, 0.2, 0.4),
        sources=("a",),
    )
    out = claims.noisy_larger_vs_clean_smaller(t)
    assert len(out) == 4  # 2 noise levels x (fewest shots, full)
    few, full = out[~out["setting"].str.endswith("full")], out[out["setting"].str.endswith("full")]
    assert list(few["verdict"]) == [REPRODUCED, NOT_REPRODUCED]  # noise 0.2, then 0.4
    # A full-data fit is one run per cell: an estimate, but no interval and so no verdict.
    assert list(full["verdict"]) == [INCONCLUSIVE] * 2 and full["ci_low"].isna().all()
    assert full["estimate"].to_numpy() == pytest.approx([0.07, -0.20], abs=0.03)


def test_best_layer_on_near_and_far_tasks():
    near = frame(
        lambda src, n, p, s, layer: 0.8 if layer == "final" else 0.6,
        layers=("block1", "final"),
        task="near",
        shots=("1",),
    )
    far = frame(
        lambda src, n, p, s, layer: 0.5 if layer == "final" else 0.6,
        layers=("block1", "final"),
        task="far",
        shots=("1",),
    )
    out = claims.layer_claims(pd.concat([near, far]), near="near", far="far")
    assert list(out["verdict"]) == [REPRODUCED, REPRODUCED]
    assert out["estimate"].to_numpy() == pytest.approx([-0.2, 0.1], abs=0.01)


def test_counterfactual_arms_against_baseline_and_random():
    plan = {
        "task": "t",
        "sources": {
            "s": {"arm": "baseline", "k": 0},
            "s-h": {"arm": "harmful", "k": 2},
            "s-p": {"arm": "helpful", "k": 2},
            "s-r": {"arm": "random", "k": 2},
        },
    }
    level = {"s": 0.70, "s-h": 0.75, "s-p": 0.60, "s-r": 0.69}
    t = frame(lambda src, n, p, s, layer: level[src], sources=tuple(level), sizes=(1000,), shots=("full",))
    t = pd.concat([t.assign(seed=i, accuracy=t["accuracy"] + 0.005 * i) for i in range(3)])  # 3 models per arm
    out = claims.counterfactual_claims(None, t, plan)
    assert len(out) == 4 and set(out["verdict"]) == {REPRODUCED}


def test_planted_class_is_ranked_first():
    rng = np.random.default_rng(0)
    masks = rng.random((200, 6)) < 0.5
    outputs = 0.5 + 0.2 * masks[:, [3]] + 0.05 * masks[:, [0]] + rng.normal(0, 0.02, (200, 4))
    (row,) = claims.planted_class_rank(list("abcdef"), masks, outputs, planted="d").to_dict("records")
    assert row["setting"] == "all target examples: d ranks 1 of 6" and row["verdict"] == REPRODUCED
    assert row["estimate"] == pytest.approx(0.15, abs=0.02)
    # Class d helps only the target examples labelled 2: diluted over all, first on its own class.
    outputs = 0.5 + 0.05 * masks[:, [0]] + rng.normal(0, 0.02, (200, 4))
    outputs[:, 3] += 0.2 * masks[:, 3]
    overall, own = claims.planted_class_rank(
        list("abcdef"), masks, outputs, "d", labels=[0, 1, 1, 2], target_label=2
    ).to_dict("records")
    assert (
        overall["verdict"] == INCONCLUSIVE and abs(overall["estimate"]) < 0.02
    )  # a: 0.05 on all; d: 0.2 on one of four
    assert own["setting"] == "target class 2 only: d ranks 1 of 6" and own["verdict"] == REPRODUCED
