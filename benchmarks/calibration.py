"""Are the claim verdicts calibrated? Simulated studies with a known truth, judged by the claims code.

Each simulated study is a transfer frame with the columns ``transferlab report`` reads
(``pretrain_run_id, pretrain_seed, seed, shots, shots_n, task, source, method, label_noise,
num_train_samples, upstream_accuracy, layer, accuracy`` ...), drawn from

    accuracy = μ(configuration, task, shots, layer) + a(pretraining run) + b(task, shots, draw) + e

with a pretraining-seed effect ``a`` (correlated ρ between a checkpoint's few-shot and full fits),
a few-shot-draw effect ``b`` shared by every checkpoint (the same draws), and run noise ``e``.
The Jain et al. kinds are simulated from their own inputs: ``class_influence`` from
:data:`MODELS` models, each trained on a random half of :data:`CLASSES` source classes, whose outputs
on :data:`EXAMPLES` target examples are

    output = 0.5 + Σ_c β_c·[model trained on c] + u(model) + e(model, example)

with the named class's β the truth and the other classes' β drawn and centred (with exact-half
subsets, a class's influence is its β minus the mean of the others'); ``counterfactual_removal``
from :data:`CF_SEEDS` pretraining seeds per follow-up arm, ``accuracy = level(seed) + effect(arm) +
e``, the per-seed level shared by every arm (the same init and data order). For each claim kind,
null studies (no effect; e_IR = 0; the non-inferiority difference exactly at −margin) and studies
with a planted effect are judged by
:func:`orchestrator.analysis.claims.evaluate`. Printed per kind: the rate of "reproduced" on nulls
(goal ≤ 5%), the coverage of the true value by the 95% interval (goal 93–97%, on nulls and planted
studies together), and the power at the planted size.

    python benchmarks/calibration.py --studies 300

``--through-mlflow N`` instead writes N studies per transfer kind as MLflow runs in transferlab's
schema, runs the report on each and checks that its claim rows equal those of ``claims.evaluate``
on the simulated frame (docs/analysis.md, "Calibration").
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.analysis import claims
from orchestrator.analysis.frame import InfluenceInputs
from orchestrator.analysis.report import build_report
from orchestrator.analysis.stats import REPRODUCED
from orchestrator.records.schema import SPEC_ARTIFACT
from orchestrator.records.tracker import Tracker
from orchestrator.spec.claims import ClaimSpec, default_claim
from tests.synthetic_runs import SyntheticStudy

SEEDS, DRAWS = 4, 3  # pretraining seeds per configuration, few-shot draws per shots setting
SD_SEED, SD_DRAW, SD_RUN, SD_RUN_FULL, RHO = 0.012, 0.03, 0.015, 0.004, 0.7
MARGIN = 0.02
MODELS, CLASSES, EXAMPLES = 64, 12, 40  # class_influence: models on random halves of the classes
SD_CLASS, SD_MODEL, SD_EXAMPLE = 0.01, 0.02, 0.05  # other classes' effects, model and example noise
CF_SEEDS, SD_LEVEL, SD_ARM_RUN = 5, 0.02, 0.01  # counterfactual_removal: seeds per arm, seed level, run noise
# kind -> (the claim judged, truth on null studies, truth on planted studies)
PLANTED = {
    "source_advantage": (default_claim("source_advantage", task="near", source="A", other="B"), 0.0, 0.03),
    "size_helps_few_shot_more": (default_claim("size_helps_few_shot_more", source="A", task="near"), 0.0, 0.03),
    "noisy_larger_noninferior": (default_claim("noisy_larger_noninferior", margin=MARGIN), -MARGIN, 0.02),
    "saturation": (default_claim("saturation", shots="1"), 0.0, 0.10),
    "e_ir_falls_with_shots": (default_claim("e_ir_falls_with_shots"), 0.0, 0.10),
    "best_layer_differs": (
        default_claim("best_layer_differs", near="near", far="far", layer="block2", shots="1"),
        0.0,
        0.03,
    ),
    "class_influence": (default_claim("class_influence", task="t", **{"class": "c0"}), 0.0, 0.02),
    "counterfactual_removal": (default_claim("counterfactual_removal", arm="harmful"), 0.0, 0.02),
}


def frame(configs: list[dict], mu, rng, tasks=("near",), shots=("1", "full"), layers=("final",), seeds=SEEDS):
    """A transfer frame for ``configs`` (dicts of pretraining params); ``mu(config, task, shots,
    layer)`` is the true mean accuracy, ``config['upstream']`` (if any) its upstream accuracy."""
    rows = []
    draw = {(t, s, d): rng.normal(0, SD_DRAW) for t, s in itertools.product(tasks, shots) for d in range(DRAWS)}
    for ci, cfg in enumerate(configs):
        for ps in range(seeds):
            a_few = rng.normal(0, SD_SEED)
            a_full = RHO * a_few + np.sqrt(1 - RHO**2) * rng.normal(0, SD_SEED)
            run = f"c{ci}-s{ps}"
            upstream = cfg.get("upstream", 0.9) + rng.normal(0, 0.002)
            for task, s, layer in itertools.product(tasks, shots, layers):
                full = s == "full"
                for d in range(1 if full else DRAWS):
                    acc = mu(cfg, task, s, layer) + (a_full if full else a_few + draw[task, s, d])
                    acc += rng.normal(0, SD_RUN_FULL if full else SD_RUN)
                    rows.append(
                        {
                            "pretrain_run_id": run,
                            "pretrain_seed": ps,
                            "seed": d,
                            "task": task,
                            "protocol": "linear_probe",
                            "shots": s,
                            "shots_n": np.inf if full else float(s),
                            "layer": layer,
                            "method": "supervised",
                            "model": "small-cnn",
                            "source": cfg.get("source", "A"),
                            "num_train_samples": float(cfg.get("size", 1000)),
                            "label_noise": cfg.get("noise", 0.0),
                            "class_fraction": 1.0,
                            "upstream_accuracy": upstream,
                            "accuracy": acc,
                        }
                    )
    return pd.DataFrame(rows)


def influence_study(truth: float, rng) -> claims.Evidence:
    """Models on random halves of the classes; class c0's influence on the mean output is ``truth``."""
    masks = np.zeros((MODELS, CLASSES), bool)
    for m in masks:
        m[rng.permutation(CLASSES)[: CLASSES // 2]] = True
    others = rng.normal(0, SD_CLASS, CLASSES - 1)
    beta = np.r_[truth, others - others.mean()]
    level = 0.5 + masks @ beta + rng.normal(0, SD_MODEL, MODELS)
    outputs = level[:, None] + rng.normal(0, SD_EXAMPLE, (MODELS, EXAMPLES))
    classes = [f"c{i}" for i in range(CLASSES)]
    x = InfluenceInputs("t", "linear_probe", "s", "full", classes, masks, outputs, np.arange(EXAMPLES))
    return claims.Evidence(influence=(x,), permutations=99)  # the permutation p is shown, not judged


def arms_study(truth: float, rng) -> claims.Evidence:
    """A counterfactual follow-up: baseline, harmful and random removal of 3 classes; harmful +``truth``."""
    rows = []
    for seed in range(CF_SEEDS):
        level = 0.7 + rng.normal(0, SD_LEVEL)
        for arm, k, effect in (("baseline", 0, 0.0), ("harmful", 3, truth), ("random", 3, -0.01)):
            rows.append({"arm": arm, "k": k, "seed": seed, "accuracy": level + effect + rng.normal(0, SD_ARM_RUN)})
    return claims.Evidence(arms=pd.DataFrame(rows))


def simulate(kind: str, truth: float, rng) -> pd.DataFrame | claims.Evidence:
    """One study for claim ``kind`` whose statistic's true value is ``truth``."""
    if kind == "class_influence":
        return influence_study(truth, rng)
    if kind == "counterfactual_removal":
        return arms_study(truth, rng)
    if kind == "source_advantage":
        cfgs = [{"source": "A"}, {"source": "B"}]
        return frame(cfgs, lambda c, t, s, lay: 0.6 + (truth if c["source"] == "A" and s != "full" else 0), rng)
    if kind == "size_helps_few_shot_more":
        cfgs = [{"size": 500}, {"size": 4000}]
        return frame(
            cfgs, lambda c, t, s, lay: 0.55 + 0.05 * (c["size"] > 500) + truth * (c["size"] > 500) * (s != "full"), rng
        )
    if kind == "noisy_larger_noninferior":
        cfgs = [{"size": 500}, {"size": 4000}, {"size": 4000, "noise": 0.2}]
        return frame(
            cfgs,
            lambda c, t, s, lay: (
                0.6 + (0.05 if c["size"] > 500 and not c.get("noise") else 0) + truth * bool(c.get("noise"))
            ),
            rng,
        )
    if kind in ("saturation", "e_ir_falls_with_shots"):
        # 10 configurations along e_DS = 0.8·e_US^1.5 + e_IR, some below the frontier (inefficient)
        e_us = np.geomspace(0.04, 0.5, 10)
        below = rng.random(10) < 0.3
        cfgs = [{"size": 100 * (i + 1), "upstream": 1 - e, "below": b} for i, (e, b) in enumerate(zip(e_us, below))]
        e_ir = {"1": truth if kind == "saturation" else 0.1 + truth, "full": 0.1}

        def mu(c, t, s, lay):
            return 1 - (0.8 * (1 - c["upstream"]) ** 1.5 + e_ir[s]) - 0.05 * c["below"]

        return frame(cfgs, mu, rng, shots=("1", "full") if kind == "e_ir_falls_with_shots" else ("1",))
    if kind == "best_layer_differs":
        cfgs = [{"size": 100 * (i + 1), "effect": rng.normal(0, 0.01)} for i in range(6)]

        def mu(c, t, s, lay):
            gap = 0.0 if lay == "final" else -0.05 + (truth + c["effect"] if t == "far" else 0.0)
            return 0.6 + gap

        return frame(cfgs, mu, rng, tasks=("near", "far"), shots=("1",), layers=("block2", "final"))
    raise ValueError(kind)


def run_kind(kind: str, studies: int, seed: int = 0) -> dict:
    """Judge ``studies`` null and ``studies`` planted studies of ``kind``; rates and counts."""
    claim, null, planted = PLANTED[kind]
    rng = np.random.default_rng(seed)
    out = {"kind": kind, "studies": studies, "null_reproduced": 0, "planted_reproduced": 0, "covered": 0, "judged": 0}
    for truth, key in ((null, "null_reproduced"), (planted, "planted_reproduced")):
        for _ in range(studies):
            rows = claims.evaluate(simulate(kind, truth, rng), [claim])
            row = rows.iloc[0]
            out[key] += row["verdict"] == REPRODUCED
            if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
                out["judged"] += 1
                out["covered"] += row["ci_low"] <= truth <= row["ci_high"]
    return out


def rates(r: dict) -> dict:
    n = r["studies"]
    return {
        "false_positive": r["null_reproduced"] / n,
        "coverage": r["covered"] / r["judged"] if r["judged"] else float("nan"),
        "power": r["planted_reproduced"] / n,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| claim kind | planted size | reproduced on nulls (≤ 5%) | 95% CI coverage (93–97%) | power |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        x = rates(r)
        lines.append(
            f"| {r['kind']} | {PLANTED[r['kind']][2]:g} "
            f"| {x['false_positive']:.1%} ({r['null_reproduced']}/{r['studies']}) "
            f"| {x['coverage']:.1%} ({r['covered']}/{r['judged']}) | {x['power']:.1%} |"
        )
    return "\n".join(lines)


def too_many_false_positives(r: dict, goal: float = 0.05, p: float = 0.01) -> bool:
    """The null 'reproduced' rate is significantly above ``goal`` (one-sided binomial, level p)."""
    return stats.binomtest(r["null_reproduced"], r["studies"], goal, alternative="greater").pvalue < p


def coverage_off(r: dict, lo: float = 0.93, hi: float = 0.97, p: float = 0.01) -> bool:
    """The coverage is significantly below ``lo`` or above ``hi`` (binomial tests, level p each)."""
    k, n = r["covered"], r["judged"]
    return (
        stats.binomtest(k, n, lo, alternative="less").pvalue < p
        or stats.binomtest(k, n, hi, alternative="greater").pvalue < p
    )


# ---------------------------------------------------------------------------------------------
# The same studies through MLflow and `transferlab report`

TRANSFER_KINDS = [k for k in PLANTED if k not in ("class_influence", "counterfactual_removal")]


def study_file(t: pd.DataFrame, claim: ClaimSpec, study: str) -> dict:
    """A study file whose grid names what the simulated frame ``t`` holds, declaring ``claim``."""
    few = sorted({s for s in t["shots"] if s != "full"}, key=float)
    sources = sorted(t["source"].unique())
    return {
        "study": study,
        "sources": {s: {"uri": "builtin:mnist"} for s in sources},
        "tasks": {k: {"uri": "builtin:digits"} for k in sorted(t["task"].unique())},
        "pretrain": {
            "method": "supervised",
            "model": "small-cnn",
            "sweep": {
                "source": sources,
                "pretrain_size": sorted(int(n) for n in t["num_train_samples"].unique()),
                "label_noise": sorted(float(p) for p in t["label_noise"].unique()),
                "seed": sorted(int(s) for s in t["pretrain_seed"].unique()),
            },
        },
        "transfer": {
            "protocol": ["linear_probe"],
            "shots": [int(s) for s in few] + (["full"] if (t["shots"] == "full").any() else []),
            "seeds": sorted(int(d) for d in t["seed"].unique()),
            "layers": sorted(t["layer"].unique()),
        },
        "claims": [
            {"kind": claim.kind, "name": claim.name, **{k: _as_written(v) for k, v in claim.params if v is not None}}
        ],
    }


def _as_written(v):
    """A claim parameter as a study file writes it: a shots setting "5" is the number 5."""
    return int(v) if isinstance(v, str) and v.isdigit() else v


def write_study(tracking_uri: str, artifact_root: Path, study: str, t: pd.DataFrame, claim: ClaimSpec) -> None:
    """``t`` as MLflow runs in transferlab's schema: a study run with its study file (declaring
    ``claim``), one pretraining run per ``pretrain_run_id`` and one transfer run per row."""
    s = SyntheticStudy(tracking_uri, study, artifact_root)
    s.client.log_text(s.study_run, yaml.safe_dump(study_file(t, claim, study), sort_keys=False), SPEC_ARTIFACT)
    parents = {}
    for r in t.drop_duplicates("pretrain_run_id").itertuples(index=False):
        size, seed = int(r.num_train_samples), int(r.pretrain_seed)
        parents[r.pretrain_run_id] = s.pretrain(r.source, size, r.upstream_accuracy, r.label_noise, seed=seed)
    for r in t.itertuples(index=False):
        s.transfer(parents[r.pretrain_run_id], r.task, r.shots, int(r.seed), r.accuracy, layer=r.layer)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Claim rows equal: the same text, numbers equal to 1e-9 (the report's JSON keeps 10
    decimals), missing intervals on both sides."""
    text = ["claim", "setting", "statistic", "interval", "verdict", "n"]
    if len(a) != len(b) or not (a[text].astype(str).to_numpy() == b[text].astype(str).to_numpy()).all():
        return False
    nums = ["estimate", "ci_low", "ci_high"]
    x, y = (f[nums].astype(float).to_numpy() for f in (a.reset_index(drop=True), b.reset_index(drop=True)))
    return bool(np.allclose(x, y, rtol=0, atol=1e-9, equal_nan=True))


def through_mlflow(studies: int, kinds=TRANSFER_KINDS, seed: int = 0, root: str | Path | None = None) -> list[dict]:
    """Per kind, ``studies`` simulated studies (nulls and planted in turn) written to a sqlite
    MLflow store under ``root`` (default: a temporary folder) and judged by the report
    (:func:`orchestrator.analysis.report.build_report`, the function behind ``transferlab report
    --json``); each result says whether its claim rows equal ``claims.evaluate`` on the simulated
    frame, so that the frame-level calibration holds for the real command."""
    with tempfile.TemporaryDirectory(prefix="calibration-mlflow-") as tmp:
        root = Path(root or tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        tracker, out = Tracker(uri), []
        for kind in kinds:
            claim, null, planted = PLANTED[kind]
            rng = np.random.default_rng(seed)
            for i in range(studies):
                truth, name = (null, planted)[i % 2], f"calibration-{kind}-{i}"
                t = simulate(kind, truth, rng)
                write_study(uri, root / "artifacts", name, t, claim)
                report = build_report(tracker, name, n_boot=0, seed=0)
                got = pd.DataFrame(report.numbers["claims"], columns=claims.COLUMNS)
                want = claims.evaluate(t, [claim])
                verdicts = "; ".join(got["verdict"])
                out.append(
                    {
                        "kind": kind,
                        "study": name,
                        "truth": truth,
                        "rows": len(got),
                        "same": same_rows(got, want),
                        "verdicts": verdicts,
                    }
                )
    return out


def mlflow_table(results: list[dict]) -> str:
    lines = [
        "| claim kind | study | truth | report's rows = claims.evaluate on the frame | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['kind']} | {r['study']} | {r['truth']:g} | {'yes' if r['same'] else 'NO'} | {r['verdicts']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=300, help="null and planted studies per claim kind (each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="*", default=list(PLANTED))
    ap.add_argument(
        "--through-mlflow",
        type=int,
        metavar="N",
        help="instead: write N studies per transfer kind to a sqlite MLflow store, run the report on each, "
        "and check its claim rows equal claims.evaluate on the simulated frame (exit 1 if any differs)",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.through_mlflow is not None and args.through_mlflow < 1:
        ap.error(f"--through-mlflow: must be at least 1 study per kind, got {args.through_mlflow}")
    if args.through_mlflow is not None:
        kinds = [k for k in args.kinds if k in TRANSFER_KINDS]
        results = through_mlflow(args.through_mlflow, kinds, args.seed)
        print(mlflow_table(results))
        print(f"\n{args.through_mlflow} studies per kind through MLflow; {time.perf_counter() - t0:.0f} s")
        return 0 if all(r["same"] for r in results) else 1
    results = [run_kind(k, args.studies, args.seed) for k in args.kinds]
    print(table(results))
    print(f"\n{args.studies} null + {args.studies} planted studies per kind; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
