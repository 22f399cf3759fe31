"""The three papers' headline claims as numbers with 95% confidence intervals and plain verdicts.

Each function takes the frames of :mod:`orchestrator.analysis.frame` (one row per finished transfer
run, joined with its pretraining run) and returns one row per setting (task, source, method,
shots ...) with the claim's statistic, its 95% CI and a verdict:

- ``reproduced``: the whole interval lies on the side the paper predicts;
- ``not reproduced``: the whole interval lies on the other side;
- ``inconclusive``: the interval contains zero (or there is too little data for one).

Intervals are bootstrap percentiles over the seeds of each cell (few-shot draws × pretraining
seeds), cells resampled independently, unless a row says otherwise (Welch t-intervals for the
counterfactual's retrained models). A cell of one run (a full-data fit of one pretraining seed)
adds no spread; a statistic of such cells only has no interval and is inconclusive. :func:`summary` turns the rows
of one claim into one verdict. ``examples/results.py`` prints these tables for docs/results.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator.analysis import fits, influence
from orchestrator.analysis.frame import at_largest_shots
from orchestrator.analysis.tables import ACC, SIZE, best_layer_table, final_layer, saturation_tables, us_ds_points
from trainers.protocols import FULL

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
COLUMNS = ["claim", "setting", "statistic", "estimate", "ci_low", "ci_high", "n", "verdict"]
N_BOOT = 2000


def verdict(lo: float, hi: float, expect: int = +1) -> str:
    """Verdict for an interval whose sign the paper predicts (``expect`` +1: above zero, -1: below)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return INCONCLUSIVE
    lo, hi = sorted((expect * lo, expect * hi))
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE


def bootstrap(
    cells: list[np.ndarray], stat: Callable[[list[float]], float], n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """``stat`` of the cells' means, and its 95% percentile interval resampling each cell on its own.

    A cell of one value contributes no spread (the interval then reflects only the other cells);
    when no cell has two values there is no interval (NaN)."""
    cells = [np.asarray(c, float)[np.isfinite(np.asarray(c, float))] for c in cells]
    if any(len(c) == 0 for c in cells):
        return float("nan"), float("nan"), float("nan")
    est = float(stat([c.mean() for c in cells]))
    if all(len(c) < 2 for c in cells):
        return est, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [stat([c[rng.integers(0, len(c), len(c))].mean() for c in cells]) for _ in range(n_boot)]
    lo, hi = fits.percentile_ci(draws)
    return est, lo, hi


def welch(a, b) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its 95% Welch t-interval (NaN without two values on each side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    h = float(stats.t.ppf(0.975, df) * se)
    return d, d - h, d + h


def _row(claim: str, setting: str, statistic: str, est_lo_hi: tuple, n: str, expect: int = +1) -> dict:
    est, lo, hi = est_lo_hi
    return {
        "claim": claim,
        "setting": setting,
        "statistic": statistic,
        "estimate": est,
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
        "verdict": verdict(lo, hi, expect),
    }


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def _cell(t: pd.DataFrame, **eq) -> np.ndarray:
    m = np.ones(len(t), bool)
    for k, v in eq.items():
        m &= (t[k] == v).to_numpy()
    return t.loc[m, ACC].to_numpy(float)


def _few(t: pd.DataFrame) -> float:
    return float(t.loc[np.isfinite(t["shots_n"]), "shots_n"].min())


def _largest(t: pd.DataFrame, source: str) -> float:
    return float(t.loc[t["source"] == source, SIZE].max())


# ---------------------------------------------------------------------------------------------
# Entezari et al.: sources, sizes and label noise


def source_spread(t: pd.DataFrame) -> pd.DataFrame:
    """ "The spread between sources is large at few shots and shrinks with full data": per task and
    method, at each source's largest clean pretraining set, (max − min over sources of accuracy) at
    the fewest shots minus the same at 'full'. Predicted: > 0."""
    t = final_layer(t)
    t = t[t["label_noise"] == 0]
    rows, few = [], _few(t)
    for (task, method), g in t.groupby(["task", "method"]):
        sources = sorted(g["source"].unique())
        if len(sources) < 2 or not (g["shots"] == FULL).any():
            continue
        cells = [
            _cell(g, source=s, shots_n=shots, **{SIZE: _largest(g, s)}) for shots in (few, np.inf) for s in sources
        ]
        k = len(sources)

        def stat(m, k=k):
            return (max(m[:k]) - min(m[:k])) - (max(m[k:]) - min(m[k:]))

        rows.append(
            _row(
                "spread across sources shrinks with shots",
                f"{task}, {method}",
                f"range across {k} sources at {few:g} shot(s) − at full",
                bootstrap(cells, stat),
                f"{min(len(c) for c in cells[:k])}/{min(len(c) for c in cells[k:])} runs per source",
            )
        )
    return _frame(rows)


def size_helps_few_shot_more(t: pd.DataFrame) -> pd.DataFrame:
    """ "More pretraining data helps few-shot more than full": per task, source and method (clean
    labels), gain in accuracy from the smallest to the largest pretraining set at the fewest shots
    minus that gain at 'full'. Predicted: > 0."""
    t = final_layer(t)
    t = t[(t["label_noise"] == 0) & np.isfinite(t[SIZE])]
    rows, few = [], _few(t)
    for (task, source, method), g in t.groupby(["task", "source", "method"]):
        lo_n, hi_n = g[SIZE].min(), g[SIZE].max()
        if lo_n == hi_n or not (g["shots"] == FULL).any():
            continue
        cells = [_cell(g, shots_n=s, **{SIZE: n}) for s in (few, np.inf) for n in (lo_n, hi_n)]
        rows.append(
            _row(
                "more data helps few-shot more than full",
                f"{task} ← {source}, {method}",
                f"gain {lo_n:,.0f}→{hi_n:,.0f} samples at {few:g} shot(s) − at full",
                bootstrap(cells, lambda m: (m[1] - m[0]) - (m[3] - m[2])),
                f"{len(cells[0])}-{len(cells[1])} runs per few-shot cell",
            )
        )
    return _frame(rows)


def noisy_larger_vs_clean_smaller(t: pd.DataFrame) -> pd.DataFrame:
    """The label-noise trade-off: per task, source and noise level p > 0, accuracy of the largest
    pretraining set with noise p minus that of the next smaller *clean* set, at the fewest shots and
    at 'full'. Entezari et al. find larger noisy sets can match or beat smaller clean ones: > 0."""
    t = final_layer(t)
    t = t[np.isfinite(t[SIZE])]
    rows, few = [], _few(t)
    for (task, source, method), g in t.groupby(["task", "source", "method"]):
        sizes = sorted(g.loc[g["label_noise"] == 0, SIZE].unique())
        if len(sizes) < 2:
            continue
        big, small = sizes[-1], sizes[-2]
        for p in sorted(g.loc[g["label_noise"] > 0, "label_noise"].unique()):
            for shots in (few, np.inf):
                cells = [
                    _cell(g, label_noise=p, shots_n=shots, **{SIZE: big}),
                    _cell(g, label_noise=0.0, shots_n=shots, **{SIZE: small}),
                ]
                label = FULL if shots == np.inf else f"{shots:g}-shot"
                rows.append(
                    _row(
                        "larger noisy set vs smaller clean set",
                        f"{task} ← {source}, {method}, {label}",
                        f"acc({big:,.0f}, noise {p:g}) − acc({small:,.0f}, clean)",
                        bootstrap(cells, lambda m: m[0] - m[1]),
                        f"{len(cells[0])}/{len(cells[1])} runs",
                    )
                )
    return _frame(rows)


# ---------------------------------------------------------------------------------------------
# Abnar et al.: saturation, hull vs all points, e_IR vs shots, layers


def saturation_claims(t: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Saturation (hull fit's e_IR > 0), hull beats all points on the held-out frontier, and e_IR
    falls with more shots (the 95% intervals of the fewest and most shots do not overlap)."""
    fitted, check = saturation_tables(us_ds_points(final_layer(t)), n_boot=n_boot, seed=seed)
    rows = []
    hull = fitted[fitted["fit_on"] == "hull"]
    for _, f in hull.iterrows():
        rows.append(
            _row(
                "downstream accuracy saturates (e_IR > 0)",
                f"{f['task']}, {f['shots']}-shot",
                "e_IR of the hull fit",
                (f["e_ir"], f["e_ir_ci_low"], f["e_ir_ci_high"]),
                f"{f['points']} models, {f['fit_points']} on the hull",
            )
        )
    for _, c in check.iterrows():
        d = c["all_points_rmse"] - c["hull_rmse"]
        rows.append(
            {
                "claim": "hull fit predicts the frontier better than an all-points fit",
                "setting": f"{c['task']}, {c['shots']}-shot",
                "statistic": "held-out RMSE(all points) − RMSE(hull); one 80/20 split, no CI",
                "estimate": d,
                "ci_low": float("nan"),
                "ci_high": float("nan"),
                "n": f"{c['heldout_targets']} frontier targets",
                "verdict": INCONCLUSIVE if not np.isfinite(d) or d == 0 else REPRODUCED if d > 0 else NOT_REPRODUCED,
            }
        )
    for task, g in hull.groupby("task"):
        g = g[np.isfinite(g["shots_n"])].sort_values("shots_n")
        if len(g) < 2:
            continue
        a, b = g.iloc[0], g.iloc[-1]
        lo, hi = a["e_ir_ci_low"] - b["e_ir_ci_high"], a["e_ir_ci_high"] - b["e_ir_ci_low"]
        v = (
            verdict(lo, hi)
            if np.isfinite(lo) and (a["e_ir_ci_low"] > b["e_ir_ci_high"] or a["e_ir_ci_high"] < b["e_ir_ci_low"])
            else INCONCLUSIVE
        )
        rows.append(
            {
                "claim": "e_IR falls with more shots",
                "setting": task,
                "statistic": f"e_IR({a['shots']}-shot) − e_IR({b['shots']}-shot)",
                "estimate": a["e_ir"] - b["e_ir"],
                "ci_low": lo,
                "ci_high": hi,
                "n": "verdict: the two intervals do not overlap",
                "verdict": v,
            }
        )
    return _frame(rows)


def layer_claims(t: pd.DataFrame, near: str, far: str) -> pd.DataFrame:
    """Best layer: on the ``near`` task the final layer beats every earlier one; on the ``far`` task
    an earlier layer beats the final one (Abnar et al.: the farther the task, the lower the best
    layer). Paired per pretraining run and few-shot draw: mean difference, t-interval."""
    t = t[t["layer"].astype(str) != ""]
    rows = []
    for task, expect in ((near, -1), (far, +1)):
        for shots, g in t[t["task"] == task].groupby("shots"):
            layers = best_layer_table(g)
            if layers.empty:
                continue
            earlier = layers[layers["layer"] != "final"].sort_values("mean").iloc[-1]["layer"]
            wide = g.pivot_table(index=["pretrain_run_id", "seed"], columns="layer", values=ACC)
            if "final" not in wide or earlier not in wide:
                continue
            m, h, n = fits.mean_ci((wide[earlier] - wide["final"]).dropna())
            rows.append(
                _row(
                    f"{'an earlier layer' if expect > 0 else 'the final layer'} is best on the "
                    f"{'far' if expect > 0 else 'near'} task",
                    f"{task}, {shots}-shot",
                    f"acc({earlier}) − acc(final), paired",
                    (m, m - h, m + h),
                    f"{n} pairs",
                    expect,
                )
            )
    return _frame(rows)


# ---------------------------------------------------------------------------------------------
# Jain et al.: influence and the counterfactual


def planted_class_rank(
    classes: list[str], masks, outputs, planted: str, labels=None, target_label: int | None = None
) -> pd.DataFrame:
    """The planted duplicate class must be the most helpful: its influence minus the best other
    class's (± 1.96 × the two Welch standard errors combined), on every target example and, given
    the examples' ``labels``, on the examples of the class it duplicates (``target_label``), where
    Jain et al. read such effects."""
    outputs = np.asarray(outputs, float)
    scopes = [("all target examples", np.ones(outputs.shape[1], bool))]
    if labels is not None and target_label is not None:
        scopes.append((f"target class {target_label} only", np.asarray(labels) == target_label))
    rows = []
    for scope, keep in scopes:
        rank = influence.ranking(classes, influence.task_influence(masks, outputs[:, keep]))
        mine = rank[rank["class"] == planted]
        if mine.empty or not keep.any():
            continue
        r = mine.iloc[0]
        other = rank[rank["class"] != planted].iloc[0]
        d, se = r["influence"] - other["influence"], float(np.hypot(r["se"], other["se"]))
        rows.append(
            _row(
                "the planted duplicate class ranks most helpful",
                f"{scope}: {planted} ranks {int(r['rank'])} of {len(rank)}",
                f"influence({planted}) − influence({other['class']}, the best other class)",
                (d, d - 1.96 * se, d + 1.96 * se),
                f"{int(r['models_with'])} models with, {int(r['models_without'])} without; {int(keep.sum())} examples",
            )
        )
    return _frame(rows)


def counterfactual_claims(arms: pd.DataFrame, followup: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """Removing the most harmful classes raises target accuracy over the baseline (all classes);
    removing the most helpful lowers it; both relative to removing as many random classes.
    ``followup``: the follow-up study's transfer frame; ``plan``: its counterfactual plan."""
    t = final_layer(followup)
    t = t[t["task"] == plan["task"]]
    if t.empty:
        return _frame([])
    t = at_largest_shots(t)
    by = {(v["arm"], v["k"]): t.loc[t["source"] == s, ACC].to_numpy(float) for s, v in plan["sources"].items()}
    base = by.get(("baseline", 0))
    rows = []
    for k in sorted({k for _, k in by if k}):
        for arm, expect in (("harmful", +1), ("helpful", -1)):
            if (arm, k) not in by:
                continue
            rows.append(
                _row(
                    f"removing the most {arm} classes {'raises' if expect > 0 else 'lowers'} target accuracy",
                    f"K={k}, vs all classes",
                    f"acc(without {arm} K) − acc(baseline), Welch",
                    welch(by[arm, k], base),
                    f"{len(by[arm, k])}/{len(base)} models",
                    expect,
                )
            )
            if ("random", k) in by:
                rows.append(
                    _row(
                        f"removing the most {arm} classes {'raises' if expect > 0 else 'lowers'} target accuracy",
                        f"K={k}, vs random K",
                        f"acc(without {arm} K) − acc(without random K), Welch",
                        welch(by[arm, k], by["random", k]),
                        f"{len(by[arm, k])}/{len(by['random', k])} models",
                        expect,
                    )
                )
    return _frame(rows)


def summary(rows: pd.DataFrame) -> str:
    """One verdict for a claim's rows: reproduced / not reproduced when at least two thirds of the
    settings with an interval say so and none says the opposite, else inconclusive; with the
    counts. Rows without an interval (one-run cells, a point check) count only if none has one."""
    if rows.empty:
        return f"{INCONCLUSIVE} (no settings)"
    has_ci = rows["ci_low"].notna() & rows["ci_high"].notna()
    judged = rows[has_ci] if has_ci.any() else rows
    counts = judged["verdict"].value_counts()
    yes, no, n = int(counts.get(REPRODUCED, 0)), int(counts.get(NOT_REPRODUCED, 0)), len(judged)
    overall = (
        REPRODUCED if yes >= 2 * n / 3 and not no else NOT_REPRODUCED if no >= 2 * n / 3 and not yes else INCONCLUSIVE
    )
    skipped = f"; {len(rows) - n} without an interval not counted" if n < len(rows) else ""
    basis = " (point estimates, no intervals)" if not has_ci.any() else ""
    return (
        f"{overall}{basis} ({yes} of {n} settings reproduced, {no} contradicted, {n - yes - no} inconclusive{skipped})"
    )
