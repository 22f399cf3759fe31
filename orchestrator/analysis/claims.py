"""The study's claims, judged: one row per setting with a statistic, its 95% interval and a verdict.

:func:`evaluate` takes the claims a study declared (``claims:`` in the study file,
:mod:`orchestrator.spec.claims`; :func:`default_claims` when it declared none) and the
:class:`Evidence` they are judged on — the transfer frame of :mod:`orchestrator.analysis.frame`,
the influence inputs (class-subset runs, datamodel sweeps) and the counterfactual follow-up's
runs per arm — and returns rows ``claim, setting, statistic, estimate, ci_low, ci_high, n,
interval, verdict``:

- ``reproduced``: the whole interval lies on the predicted side (of zero, or of −margin for a
  non-inferiority claim);
- ``not reproduced``: the whole interval lies on the other side;
- ``inconclusive``: the interval straddles it, or there is none (``too few to judge``: fewer than
  3 pretraining seeds in a configuration, fewer than 5 hull points, a fit parameter at its bound).

``n`` is the number of units the interval rests on (pretraining seeds per configuration, or
configurations for fits and layers, models for class influence, seed pairs for counterfactual
arms); ``interval`` says how it was formed (:mod:`.stats`). :func:`summary` turns a claim's rows
into one verdict. Rows resting on CLIP runs that did not learn are inconclusive
(:mod:`.clip_gate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from scipy import stats as sps

from orchestrator.analysis import counterfactual as cf
from orchestrator.analysis import fits, influence
from orchestrator.analysis.clip_gate import EVIDENCE, evidence_pairs, gate_clip_rows, unlearned_clip_sources
from orchestrator.analysis.frame import PRETRAIN_SEED, InfluenceInputs
from orchestrator.analysis.head_decay import head_decay_disagreement
from orchestrator.analysis.influence import PERMUTATIONS
from orchestrator.analysis.stats import (
    INCONCLUSIVE,
    MIN_UNITS,
    NOT_REPRODUCED,
    REPRODUCED,
    TOO_FEW,
    Interval,
    contrast,
    t_interval,
    too_few,
    welch_sum,
)
from orchestrator.analysis.stats import verdict as judge
from orchestrator.analysis.tables import ACC, SIZE, final_layer
from orchestrator.records.schema import METRIC_UPSTREAM_ACCURACY, PARAM_CLASS_FRACTION, PRETRAIN_SETTING_PARAMS
from orchestrator.spec.claims import CLAIM_KINDS, ClaimSpec, default_claim
from trainers.protocols import FINAL_LAYER, FULL

COLUMNS = ["claim", "setting", "statistic", "estimate", "ci_low", "ci_high", "n", "interval", "verdict"]
CONFIG = "config"  # the column naming a pretraining configuration (every pretraining param but the seed)
_CONFIG_KEYS = ("method", "source", "model", SIZE, "label_noise", PARAM_CLASS_FRACTION, *PRETRAIN_SETTING_PARAMS)


@dataclass(frozen=True)
class Evidence:
    """What a study's claims are judged on, gathered once by ``transferlab report``.

    ``transfer``: the transfer frame (:func:`orchestrator.analysis.frame.load_study`);
    ``influence``: :class:`~orchestrator.analysis.frame.InfluenceInputs` of its class-subset runs
    and datamodel sweeps; ``arms``: :func:`orchestrator.analysis.counterfactual.arm_runs` of its
    counterfactual follow-up (None: no follow-up with finished runs). ``permutations`` and
    ``seed``: of the permutation test shown beside a class_influence verdict. ``tested``: that
    test's class summary per influence input, filled by :func:`evaluate` so that several
    class_influence claims on one input pay for one test (a fresh cache per call)."""

    transfer: pd.DataFrame = field(default_factory=pd.DataFrame)
    influence: tuple[InfluenceInputs, ...] = ()
    arms: pd.DataFrame | None = None
    permutations: int = PERMUTATIONS
    seed: int = 0
    tested: dict = field(default_factory=dict, repr=False, compare=False)


def _evidence(e: pd.DataFrame | Evidence) -> Evidence:
    """``e`` as Evidence (a bare transfer frame: no influence, no follow-up), with its frame prepared."""
    e = e if isinstance(e, Evidence) else Evidence(e)
    t = prepare(e.transfer) if len(e.transfer) else e.transfer
    return Evidence(t, tuple(e.influence), e.arms, e.permutations, e.seed)


def verdict(lo: float, hi: float, expect: int = +1) -> str:
    """Verdict for an interval whose sign is predicted (``expect`` +1: above zero, -1: below)."""
    return judge(Interval(float("nan"), lo, hi, 0, ""), expect)


def _row(
    claim: str, setting: str, statistic: str, iv: Interval, expect=+1, threshold=0.0, note="", evidence=frozenset()
):
    """One claim row; ``evidence``: the (method, source) pairs it rests on (for the CLIP gate)."""
    v = judge(iv, expect, threshold) if not note else INCONCLUSIVE
    return {
        EVIDENCE: evidence,
        "claim": claim,
        "setting": setting,
        "statistic": statistic,
        "estimate": iv.estimate,
        "ci_low": iv.ci_low,
        "ci_high": iv.ci_high,
        "n": iv.n,
        "interval": note or iv.method,
        "verdict": v,
    }


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def prepare(t: pd.DataFrame) -> pd.DataFrame:
    """The frame with ``shots`` as text and a ``config`` label per pretraining configuration."""
    t = t.reset_index(drop=True)
    t["shots"] = t["shots"].astype(str)
    if PRETRAIN_SEED not in t:
        t[PRETRAIN_SEED] = t["pretrain_run_id"]
    keys = [k for k in _CONFIG_KEYS if k in t]
    t[CONFIG] = ["|".join(map(str, r)) for r in t[keys].itertuples(index=False)] if keys else "all"
    return t


def _few(t: pd.DataFrame, shots) -> str | None:
    """The claim's shots setting as text; default: the fewest few-shot setting of ``t``."""
    if shots is not None:
        return str(shots)
    few = t[np.isfinite(t["shots_n"])]
    return None if few.empty else str(few.sort_values("shots_n")["shots"].iloc[0])


def _clean(t: pd.DataFrame) -> pd.DataFrame:
    t = final_layer(t[t["protocol"] != "zero_shot"])  # claims compare fits on the task's labels
    if PARAM_CLASS_FRACTION in t:
        t = t[t[PARAM_CLASS_FRACTION] == t[PARAM_CLASS_FRACTION].max()]
    return t


def _largest_config(g: pd.DataFrame) -> str:
    return g.assign(_size=g[SIZE].fillna(np.inf)).sort_values("_size")[CONFIG].iloc[-1]


def _each(t: pd.DataFrame, column: str, value) -> list:
    return [value] if value is not None else sorted(t[column].dropna().unique())


# ---------------------------------------------------------------------------------------------
# Entezari et al.: sources, sizes and label noise


def source_advantage(t: pd.DataFrame, c: ClaimSpec) -> list[dict]:
    task, src, other = c.get("task"), c.get("source"), c.get("other")
    rows = []
    g = _clean(t[t["task"] == task])
    g = g[g["label_noise"] == 0]
    few = _few(g, c.get("shots"))
    for (method, protocol), m in g.groupby(["method", "protocol"]):
        setting = f"{task}, {method}, {protocol}: {src} vs {other}"
        stat = f"[acc({src}) − acc({other})] at {few} shot(s) − at full"
        a, b = m[m["source"] == src], m[m["source"] == other]
        if a.empty or b.empty or few is None or not (m["shots"] == FULL).any():
            rows.append(_row(c.name, setting, stat, too_few(np.nan, 0), note="a source or 'full' has no runs"))
            continue
        ca, cb = _largest_config(a), _largest_config(b)
        w = {(ca, few): 1.0, (ca, FULL): -1.0, (cb, few): -1.0, (cb, FULL): 1.0}
        pairs = evidence_pairs(pd.concat([a, b]))
        rows.append(_row(c.name, setting, stat, contrast(m, w, CONFIG, ACC), c.expect, evidence=pairs))
    return rows


def size_helps_few_shot_more(t: pd.DataFrame, c: ClaimSpec) -> list[dict]:
    rows = []
    t = _clean(t)
    t = t[(t["label_noise"] == 0) & np.isfinite(t[SIZE])]
    for task in _each(t, "task", c.get("task")):
        for source in _each(t, "source", c.get("source")):
            g = t[(t["task"] == task) & (t["source"] == source)]
            few = _few(g, c.get("shots"))
            for (method, protocol), m in g.groupby(["method", "protocol"]):
                lo_n, hi_n = m[SIZE].min(), m[SIZE].max()
                if lo_n == hi_n or few is None or not (m["shots"] == FULL).any():
                    continue
                small = m.loc[m[SIZE] == lo_n, CONFIG].iloc[0]
                big = m.loc[m[SIZE] == hi_n, CONFIG].iloc[0]
                w = {(big, few): 1.0, (big, FULL): -1.0, (small, few): -1.0, (small, FULL): 1.0}
                rows.append(
                    _row(
                        c.name,
                        f"{task} ← {source}, {method}, {protocol}",
                        f"gain {lo_n:,.0f}→{hi_n:,.0f} samples at {few} shot(s) − at full",
                        contrast(m, w, CONFIG, ACC),
                        c.expect,
                        evidence=evidence_pairs(m),
                    )
                )
    return rows


def noisy_larger_noninferior(t: pd.DataFrame, c: ClaimSpec) -> list[dict]:
    rows, margin = [], c.get("margin")
    t = _clean(t)
    t = t[np.isfinite(t[SIZE])]
    for task in _each(t, "task", c.get("task")):
        for source in _each(t, "source", c.get("source")):
            g = t[(t["task"] == task) & (t["source"] == source)]
            shots = _few(g, c.get("shots"))
            for (method, protocol), m in g.groupby(["method", "protocol"]):
                clean = sorted(m.loc[m["label_noise"] == 0, SIZE].unique())
                noises = [p for p in _each(m, "label_noise", c.get("label_noise")) if p > 0]
                for p in noises:
                    noisy = m[m["label_noise"] == p]
                    if noisy.empty:
                        continue
                    big = noisy[SIZE].max()
                    smaller = [s for s in clean if s < big]
                    if not smaller:
                        continue
                    small = smaller[-1]
                    cn = noisy.loc[noisy[SIZE] == big, CONFIG].iloc[0]
                    cc = m.loc[(m["label_noise"] == 0) & (m[SIZE] == small), CONFIG].iloc[0]
                    rows.append(
                        _row(
                            c.name,
                            f"{task} ← {source}, {method}, {protocol}, {shots} shot(s)",
                            f"acc({big:,.0f}, noise {p:g}) − acc({small:,.0f}, clean); non-inferior above −{margin:g}",
                            contrast(m, {(cn, shots): 1.0, (cc, shots): -1.0}, CONFIG, ACC),
                            +1,
                            threshold=-margin,
                            evidence=evidence_pairs(m),
                        )
                    )
    return rows


# ---------------------------------------------------------------------------------------------
# Abnar et al.: saturation, e_IR vs shots, layers


def config_points(t: pd.DataFrame) -> pd.DataFrame:
    """One point per configuration: mean upstream accuracy (over its pretraining runs) and mean
    downstream accuracy (over its runs and draws), with its number of pretraining seeds."""
    per_run = t.groupby([CONFIG, "pretrain_run_id"], as_index=False).agg(
        us=(METRIC_UPSTREAM_ACCURACY, "first"), ds=(ACC, "mean")
    )
    return per_run.groupby(CONFIG, as_index=False).agg(us=("us", "mean"), ds=("ds", "mean"), seeds=("us", "size"))


def e_ir_fit(t: pd.DataFrame) -> dict:
    """:func:`fits.e_ir_profile` on the upper hull of the configurations' mean accuracies, its
    interval widened for the few-shot draws: every configuration saw the same draws, so their
    luck shifts the whole frontier, and e_IR with it, by an offset the fit's residuals cannot
    see. Its standard error (the spread of the draws' mean accuracy over configurations, over
    √draws) is combined with each side's profile half-width read as a standard error, at the t
    quantile of the Welch–Satterthwaite degrees of freedom."""
    p = config_points(t)
    p = p[np.isfinite(p["us"]) & np.isfinite(p["ds"])]
    hull = fits.upper_hull(p["us"].to_numpy(float), p["ds"].to_numpy(float))
    out = fits.e_ir_profile(p["us"].to_numpy(float)[hull], p["ds"].to_numpy(float)[hull])
    out["configs"] = len(p)
    se_draw, df_draw = _draw_se(t)
    if df_draw and np.isfinite(out["e_ir"]):
        df_fit = out["points"] - 3
        for end, sign in (("ci_low", -1), ("ci_high", +1)):
            if not np.isfinite(out[end]):
                continue
            se_fit = abs(out[end] - out["e_ir"]) / sps.t.ppf(0.975, df_fit)
            se = float(np.hypot(se_fit, se_draw))
            df = se**4 / (se_fit**4 / df_fit + se_draw**4 / df_draw) if se > 0 else df_fit
            out[end] = out["e_ir"] + sign * float(sps.t.ppf(0.975, df) * se)
    return out


def _fit_interval(f: dict) -> tuple[Interval, str]:
    """The e_IR interval of a fit, and why it cannot count as evidence ('' when it can)."""
    if f["points"] < fits.MIN_HULL_POINTS:
        return too_few(f["e_ir"], f["points"]), f"{TOO_FEW}: too few hull points ({f['points']} < 5)"
    iv = Interval(f["e_ir"], f["ci_low"], f["ci_high"], f["points"], "profile likelihood + draws")
    return iv, "α at its bound" if f["alpha_at_bound"] else ""


def saturation(t: pd.DataFrame, c: ClaimSpec) -> list[dict]:
    rows = []
    t = _clean(t)
    for task in _each(t, "task", c.get("task")):
        g = t[t["task"] == task]
        for shots in [str(c.get("shots"))] if c.get("shots") is not None else sorted(g["shots"].unique()):
            f = e_ir_fit(g[g["shots"] == shots])
            iv, note = _fit_interval(f)
            rows.append(
                _row(
                    c.name,
                    f"{task}, {shots} shot(s)",
                    f"e_IR of the hull fit ({f['configs']} configurations)",
                    iv,
                    c.expect,
                    note=note,
                    evidence=evidence_pairs(g[g["shots"] == shots]),
                )
            )
    return rows


def _draw_se(t: pd.DataFrame) -> tuple[float, int]:
    """Standard error of the few-shot draws' shared luck (the spread over draws of their mean
    accuracy over configurations, over √draws) and its degrees of freedom; (0, 0) for one draw."""
    per_draw = t.pivot_table(index=CONFIG, columns="seed", values=ACC, aggfunc="mean").mean(axis=0)
    if len(per_draw) < 2:
        return 0.0, 0
    return float(per_draw.std(ddof=1) / np.sqrt(len(per_draw))), len(per_draw) - 1


def _runs_by_config(g: pd.DataFrame, fewer: str, more: str) -> tuple[np.ndarray, ...]:
    """``[configurations x runs]`` arrays of upstream accuracy and of the mean accuracy over the
    draws at ``fewer`` and at ``more`` shots, one column per pretraining run (NaN padding), runs in
    pretraining-seed order (a bootstrap's picks then do not depend on MLflow's run ids)."""
    runs = [CONFIG, PRETRAIN_SEED, "pretrain_run_id"]
    ds = g.pivot_table(index=runs, columns="shots", values=ACC, aggfunc="mean")
    us = g.groupby(runs)[METRIC_UPSTREAM_ACCURACY].first()
    per_run = pd.DataFrame({"us": us, "a": ds.get(fewer), "b": ds.get(more)}).dropna().reset_index()
    per_run["j"] = per_run.groupby(CONFIG).cumcount()
    wide = per_run.pivot(index=CONFIG, columns="j", values=["us", "a", "b"])
    return tuple(wide[v].to_numpy(float) for v in ("us", "a", "b"))


def e_ir_falls_with_shots(t: pd.DataFrame, c: ClaimSpec, n_boot: int = 200, seed: int = 0) -> list[dict]:
    """e_IR(fewer) − e_IR(more), each from :func:`e_ir_fit`'s hull fit. The two fits rest on the
    same configurations, so their errors are correlated: the fits' share of the difference's
    standard error comes from a paired bootstrap of the pretraining runs
    (:func:`fits.paired_e_ir_difference_sd`, ``n_boot`` replicates), and each shots setting's own
    few-shot draws add theirs (:func:`_draw_se`); a t-interval at the Welch–Satterthwaite degrees
    of freedom (the fits' share: hull points × (runs − 1)). Too few to judge: either fit too few
    to judge or α at its bound, or fewer than 3 pretraining runs in a configuration."""
    rows = []
    t = _clean(t)
    for task in _each(t, "task", c.get("task")):
        g = t[t["task"] == task]
        order = g.drop_duplicates("shots").sort_values("shots_n")["shots"].tolist()
        if len(order) < 2:
            continue
        fewer = str(c.get("fewer_shots")) if c.get("fewer_shots") is not None else order[0]
        more = str(c.get("more_shots")) if c.get("more_shots") is not None else order[-1]
        ga, gb = g[g["shots"] == fewer], g[g["shots"] == more]
        (ia, na), (ib, nb) = _fit_interval(e_ir_fit(ga)), _fit_interval(e_ir_fit(gb))
        stat, pairs = f"e_IR({fewer} shot(s)) − e_IR({more} shot(s))", evidence_pairs(g[g["shots"].isin([fewer, more])])
        rows.append(
            _row(
                c.name,
                task,
                stat,
                _paired_difference(g, ia, ib, fewer, more, n_boot, seed),
                c.expect,
                note=na or nb,
                evidence=pairs,
            )
        )
    return rows


def _paired_difference(g, ia: Interval, ib: Interval, fewer: str, more: str, n_boot: int, seed: int) -> Interval:
    """e_IR(fewer) − e_IR(more) with the interval of :func:`e_ir_falls_with_shots`; ``ia``, ``ib``:
    the two fits' intervals (their estimates and hull points)."""
    d, n = ia.estimate - ib.estimate, min(ia.n, ib.n)
    if not (ia.judged and ib.judged):
        return too_few(d, n)
    us, a, b = _runs_by_config(g, fewer, more)
    runs = int(np.isfinite(us).sum(axis=1).min()) if len(us) else 0
    if runs < MIN_UNITS:
        return too_few(d, runs)
    se_fit = fits.paired_e_ir_difference_sd(us, a, b, n_boot, seed)
    if not np.isfinite(se_fit):
        return too_few(d, runs)
    parts = [(se_fit, n * (runs - 1)), _draw_se(g[g["shots"] == fewer]), _draw_se(g[g["shots"] == more])]
    parts = [(se, df) for se, df in parts if df > 0 and se > 0]
    se = float(np.sqrt(sum(s**2 for s, _ in parts)))
    df = se**4 / sum(s**4 / k for s, k in parts) if se > 0 else n - 3
    h = float(sps.t.ppf(0.975, df) * se)
    return Interval(d, d - h, d + h, n, "paired bootstrap of runs + draws")


def best_layer_differs(t: pd.DataFrame, c: ClaimSpec) -> list[dict]:
    """Per configuration (seeds and draws averaged, each draw paired across layers):
    [acc(layer) − acc(final)] on the far task − the same on the near task; t-interval over
    configurations."""
    layer, final = c.get("layer"), c.get("final")
    t = t.assign(layer=t["layer"].astype(str).replace("", FINAL_LAYER))
    shots = _few(t[t["task"].isin([c.get("near"), c.get("far")])], c.get("shots"))
    per_task = {}
    for task in (c.get("near"), c.get("far")):
        g = t[(t["task"] == task) & (t["shots"] == shots) & t["layer"].isin([layer, final])]
        wide = g.pivot_table(index=[CONFIG, "pretrain_run_id", "seed"], columns="layer", values=ACC)
        if layer not in wide or final not in wide:
            per_task[task] = pd.Series(dtype=float)
            continue
        per_task[task] = (wide[layer] - wide[final]).groupby(level=CONFIG).mean()
    both = pd.concat(per_task, axis=1).dropna() if all(len(s) for s in per_task.values()) else pd.DataFrame()
    values = (both[c.get("far")] - both[c.get("near")]).to_numpy() if len(both) else []
    iv = t_interval(values)
    if len(values):
        iv = Interval(iv.estimate, iv.ci_low, iv.ci_high, iv.n, "t over configurations" if iv.judged else TOO_FEW)
    return [
        _row(
            c.name,
            f"{c.get('far')} vs {c.get('near')}, {shots} shot(s)",
            f"[acc({layer}) − acc({final})] on {c.get('far')} − on {c.get('near')}",
            iv,
            c.expect,
            evidence=evidence_pairs(t[t["task"].isin([c.get("near"), c.get("far")]) & (t["shots"] == shots)]),
        )
    ]


# ---------------------------------------------------------------------------------------------
# Jain et al.: a named source class, the counterfactual arms


def class_influence(ev: Evidence, c: ClaimSpec) -> list[dict]:
    """Per influence input of the task (and source): the class's influence on the models' mean output,
    mean(with) − mean(without), Welch (models are independent draws of random subsets). Its rank and,
    from :func:`influence.permutation_test`, the examples it is found on (family-wise p) and its
    top-influencer count's p are shown beside it; the verdict rests on the interval alone."""
    task, source, cls = c.get("task"), c.get("source"), c.get("class")
    inputs = [x for x in ev.influence if x.task == task and source in (None, x.source)]
    stat = f"influence({cls}): mean output of models with it − without it, Welch"
    if not inputs:
        where = f"{task} ← {source}" if source else task
        return [
            _row(
                c.name,
                where,
                stat,
                too_few(np.nan, 0),
                note="no influence inputs (class-subset runs or a datamodel sweep)",
            )
        ]
    rows = []
    for x in inputs:
        setting = f"{task} ← {x.source}, {x.protocol}, {x.shots} shot(s)"
        if cls not in x.classes:
            rows.append(_row(c.name, setting, stat, too_few(np.nan, 0), note=f"'{cls}' is not a class of {x.source}"))
            continue
        i = list(x.classes).index(cls)
        y = np.nanmean(np.asarray(x.outputs, float), axis=1)
        with_it = np.asarray(x.masks, bool)[:, i]
        iv = welch_sum([y[with_it], y[~with_it]], [1.0, -1.0])
        rank = influence.ranking(x.classes, influence.task_influence(x.masks, x.outputs))
        r = int(rank.loc[rank["class"] == cls, "rank"].iloc[0])
        test = _permutation_summary(ev, x)
        top = test[test["class"] == cls].iloc[0]
        rows.append(
            _row(
                c.name,
                f"{setting}: {cls} ranks {r} of {len(rank)}",
                f"{stat}; per example: family-wise p < {influence.FAMILY_ALPHA:g} on {int(top['found_examples'])} "
                f"(smallest {top['min_p_family']:.3g}); top influencer of {int(top['top_examples'])} examples "
                f"(null mean {top['top_examples_null']:.1f}, permutation p = {top['p']:.3g})",
                iv,
                c.expect,
            )
        )
    return rows


def _permutation_summary(ev: Evidence, x: InfluenceInputs) -> pd.DataFrame:
    """:func:`influence.permutation_test`'s class summary of ``x``, computed once per evaluate()."""
    key = id(x)
    if key not in ev.tested:
        ev.tested[key] = influence.permutation_test(x.masks, x.outputs, ev.permutations, ev.seed).class_summary(
            x.classes
        )
    return ev.tested[key]


def counterfactual_removal(ev: Evidence, c: ClaimSpec) -> list[dict]:
    """Per K: acc(without the arm's K classes) − acc(baseline or random K), paired by pretraining
    seed (:func:`orchestrator.analysis.counterfactual.paired_differences`), Student t."""
    arm, versus = c.get("arm"), c.get("versus")
    if ev.arms is None or ev.arms.empty:
        note = "no counterfactual follow-up with finished runs"
        return [_row(c.name, f"{arm} arm", f"acc(without {arm} K) − acc({versus})", too_few(np.nan, 0), note=note)]
    ks = [c.get("k")] if c.get("k") is not None else cf.planned_ks(ev.arms, arm)
    if not ks:
        stat = f"acc(without {arm} K) − acc({versus})"
        return [_row(c.name, f"{arm} arm", stat, too_few(np.nan, 0), note=f"the follow-up has no {arm} arm")]
    rows = []
    for k in ks:
        setting, stat = cf.versus_setting(k, versus), cf.paired_statistic(arm, k, versus)
        d = cf.paired_differences(ev.arms, arm, k, versus)
        if d is None:
            other = "the baseline" if versus == cf.BASELINE else f"random K={k}"
            note = f"the follow-up has no runs of {arm} K={k} or of {other}"
            rows.append(_row(c.name, setting, stat, too_few(np.nan, 0), note=note))
            continue
        rows.append(_row(c.name, setting, stat, cf.paired_interval(d), c.expect))
    return rows


def _on_transfer(kind):
    """A kind judged on the transfer frame alone; no rows without transfer runs."""

    def judge_(ev: Evidence, c: ClaimSpec) -> list[dict]:
        return kind(ev.transfer, c) if len(ev.transfer) else []

    return judge_


# kind -> function(Evidence, ClaimSpec) -> rows
EVALUATE = {
    "source_advantage": _on_transfer(source_advantage),
    "size_helps_few_shot_more": _on_transfer(size_helps_few_shot_more),
    "noisy_larger_noninferior": _on_transfer(noisy_larger_noninferior),
    "saturation": _on_transfer(saturation),
    "e_ir_falls_with_shots": _on_transfer(e_ir_falls_with_shots),
    "best_layer_differs": _on_transfer(best_layer_differs),
    "head_decay_disagreement": _on_transfer(partial(head_decay_disagreement, config_keys=_CONFIG_KEYS, make_row=_row)),
    "class_influence": class_influence,
    "counterfactual_removal": counterfactual_removal,
}
assert set(EVALUATE) == set(CLAIM_KINDS)


def default_claims(evidence: pd.DataFrame | Evidence) -> list[ClaimSpec]:
    """The claims that apply to a study, at their defaults, for a study that declared none:
    the transfer kinds its grid allows, and counterfactual_removal for each removal arm its
    follow-up has (against the baseline, and against random removal when that arm was planned).
    ``best_layer_differs`` and ``class_influence`` need a layer or class named in advance and are
    never defaults."""
    ev = _evidence(evidence)
    out = _transfer_defaults(ev.transfer) if len(ev.transfer) else []
    if ev.arms is not None and len(ev.arms):
        planned = set(ev.arms["arm"])
        for arm in ("harmful", "helpful"):
            if arm in planned:
                out.append(default_claim("counterfactual_removal", arm=arm))
                if "random" in planned:
                    out.append(default_claim("counterfactual_removal", arm=arm, versus="random"))
    return out


def _transfer_defaults(t: pd.DataFrame) -> list[ClaimSpec]:
    out = []
    has_full, few = (t["shots"] == FULL).any(), np.isfinite(t["shots_n"]).any()
    clean = t[t["label_noise"] == 0]
    sources = sorted(clean["source"].unique())
    for task in sorted(t["task"].unique()):
        for i, a in enumerate(sources):
            for b in sources[i + 1 :]:
                if has_full and few:
                    out.append(default_claim("source_advantage", task=task, source=a, other=b))
    if has_full and few and (clean.groupby("source")[SIZE].nunique() >= 2).any():
        out.append(default_claim("size_helps_few_shot_more"))
    if (t["label_noise"] > 0).any() and clean[SIZE].nunique() >= 2:
        out.append(default_claim("noisy_larger_noninferior"))
    if METRIC_UPSTREAM_ACCURACY in t and t[CONFIG].nunique() >= fits.MIN_HULL_POINTS:
        out.append(default_claim("saturation"))
        if t["shots"].nunique() >= 2:
            out.append(default_claim("e_ir_falls_with_shots"))
    return out


def evaluate(evidence: pd.DataFrame | Evidence, claims: list[ClaimSpec] | tuple = ()) -> pd.DataFrame:
    """Every claim's rows (:data:`COLUMNS`); ``claims`` empty: :func:`default_claims`.
    ``evidence``: an :class:`Evidence`, or a bare transfer frame (the transfer kinds only)."""
    ev = _evidence(evidence)
    rows = []
    for c in claims or default_claims(ev):
        rows += EVALUATE[c.kind](ev, c)
    return _frame(gate_clip_rows(rows, unlearned_clip_sources(ev.transfer)))


def overall(rows: pd.DataFrame, claims: list[ClaimSpec] | tuple = ()) -> list[dict]:
    """One verdict per claim (:func:`summary` of its rows), in the order claimed."""
    names = [c.name for c in claims] or list(dict.fromkeys(rows["claim"]))
    out = []
    for name in names:
        text = summary(rows[rows["claim"] == name])
        out.append({"claim": name, "verdict": text.split(" (", 1)[0], "summary": text})
    return out


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
