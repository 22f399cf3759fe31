"""Intervals for claims about a study, from the way its runs were drawn.

A study's transfer accuracies come from two levels of chance: the pretraining run (its seed:
init, subset, noise draw) and the few-shot draw (the transfer ``seed``). Every checkpoint of a
task at a shots setting sees the *same* draws, so draw effects are shared across checkpoints and
cancel in a contrast between them; a checkpoint's few-shot and full fits share its pretraining
effect. The unit of replication is therefore the pretraining seed of a configuration (a
*unit*), and a statistic is first computed within each unit, draws averaged, shots paired:

- :func:`contrast` — a linear contrast of cell means, Σ_c w_c·mean(cell c) where a cell is a
  configuration at a shots setting. Per unit, ``u = Σ_shots w·(mean over draws)``; configurations
  with the same seed labels are paired by seed (one-sample t on the per-seed sums), otherwise
  combined by Welch–Satterthwaite. With at least :data:`BOOTSTRAP_UNITS` units per configuration
  the interval comes from :func:`hierarchical_bootstrap` instead.
- A level with fewer than :data:`MIN_UNITS` units gives no interval: ``too few to judge``
  (estimate kept, interval NaN, n stated).

:func:`verdict` turns an interval into reproduced / not reproduced / inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
LEVEL = 0.95
MIN_UNITS = 3  # fewer units at a level: too few to judge
BOOTSTRAP_UNITS = 20  # from this many units per configuration, a bootstrap instead of a t-interval
N_BOOT = 2000
TOO_FEW = "too few to judge"


@dataclass(frozen=True)
class Interval:
    """A statistic's estimate, its 95% interval (NaN: none), the units it rests on and how."""

    estimate: float
    ci_low: float
    ci_high: float
    n: int  # the fewest units of any configuration that entered
    method: str  # 't (paired)', 't (Welch)', 'hierarchical bootstrap', 'profile likelihood', TOO_FEW ...

    @property
    def judged(self) -> bool:
        return bool(np.isfinite(self.ci_low) and np.isfinite(self.ci_high))


def too_few(estimate: float, n: int) -> Interval:
    return Interval(float(estimate), float("nan"), float("nan"), int(n), TOO_FEW)


def verdict(iv: Interval, expect: int = +1, threshold: float = 0.0) -> str:
    """``reproduced`` when the whole interval lies beyond ``threshold`` on the ``expect`` side
    (+1: above, -1: below), ``not reproduced`` when it lies wholly on the other side, else
    ``inconclusive`` (also without an interval)."""
    if not iv.judged:
        return INCONCLUSIVE
    lo, hi = sorted((expect * (iv.ci_low - threshold), expect * (iv.ci_high - threshold)))
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE


def t_interval(values) -> Interval:
    """Mean of ``values`` (one per unit) with its 95% Student-t interval; too few below MIN_UNITS."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < MIN_UNITS:
        return too_few(v.mean() if len(v) else float("nan"), len(v))
    m, se = float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))
    h = float(stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * se)
    return Interval(m, m - h, m + h, len(v), "t")


def welch_sum(groups: list[np.ndarray], signs: list[float]) -> Interval:
    """Σ sign·mean(group) over independent groups, with a Welch–Satterthwaite t-interval."""
    groups = [np.asarray(g, float)[np.isfinite(np.asarray(g, float))] for g in groups]
    n = min(len(g) for g in groups)
    est = float(sum(s * g.mean() for s, g in zip(signs, groups))) if n else float("nan")
    if n < MIN_UNITS:
        return too_few(est, n)
    v = [g.var(ddof=1) / len(g) for g in groups]
    se2 = float(sum(v))
    if se2 == 0:
        return Interval(est, est, est, n, "t (Welch)")
    df = se2**2 / sum(vi**2 / (len(g) - 1) for vi, g in zip(v, groups))
    h = float(stats.t.ppf(0.5 + LEVEL / 2, df) * np.sqrt(se2))
    return Interval(est, est - h, est + h, n, "t (Welch)")


def unit_values(t: pd.DataFrame, weights: dict, config: str, value: str) -> dict:
    """Per configuration, per pretraining seed: Σ_shots w·(mean of ``value`` over the draws).

    ``weights`` maps (configuration, shots) → w; ``t`` has columns ``config`` (the configuration's
    label), ``shots``, ``pretrain_seed``, the draw ``seed`` and ``value``. A seed missing any of its
    configuration's shots cells is left out (its paired difference is undefined)."""
    out = {}
    for c in dict.fromkeys(c for c, _ in weights):
        parts = []
        for (cc, shots), w in weights.items():
            if cc != c:
                continue
            cell = t[(t[config] == c) & (t["shots"] == shots)]
            parts.append(w * cell.groupby("pretrain_seed")[value].mean())
        out[c] = pd.concat(parts, axis=1).dropna().sum(axis=1) if parts else pd.Series(dtype=float)
    return out


def contrast(
    t: pd.DataFrame, weights: dict, config: str = "config", value: str = "accuracy", seed: int = 0
) -> Interval:
    """Σ w·mean(cell) with its 95% interval (see the module docstring for how units are formed).

    Configurations that hold the same pretraining seed labels are paired by seed (the labels mean
    the same init and nested subset); otherwise they are independent groups."""
    units = unit_values(t, weights, config, value)
    n = min((len(u) for u in units.values()), default=0)
    est = float(sum(u.mean() for u in units.values())) if n else float("nan")
    if n < MIN_UNITS:
        return too_few(est, n)
    if n >= BOOTSTRAP_UNITS:
        return hierarchical_bootstrap(t, weights, config, value, seed=seed)
    labels = [frozenset(u.index) for u in units.values()]
    if len(units) > 1 and all(lab == labels[0] for lab in labels):
        paired = sum(u.sort_index() for u in units.values())
        iv = t_interval(paired.to_numpy())
        return Interval(iv.estimate, iv.ci_low, iv.ci_high, iv.n, "t (paired by seed)")
    if len(units) == 1:
        iv = t_interval(next(iter(units.values())).to_numpy())
        return Interval(iv.estimate, iv.ci_low, iv.ci_high, iv.n, "t")
    return welch_sum([u.to_numpy() for u in units.values()], [1.0] * len(units))


def hierarchical_bootstrap(
    t: pd.DataFrame, weights: dict, config: str = "config", value: str = "accuracy", n_boot: int = N_BOOT, seed: int = 0
) -> Interval:
    """Σ w·mean(cell) with a 95% percentile interval from a two-level bootstrap: each replicate
    resamples every configuration's pretraining seeds (the same seeds at all its shots settings:
    a checkpoint stays paired with itself), then the draws of each shots setting, drawing the
    *same* draw indices for every configuration (checkpoints stay paired through their shared
    draws). Meant for many units (:data:`BOOTSTRAP_UNITS`); with few, percentile intervals are
    too narrow and :func:`contrast` uses t-intervals."""
    rng = np.random.default_rng(seed)
    cells = {}  # (config, shots) -> [seeds x draws] array, draws aligned by draw seed
    draws = {shots: sorted(t.loc[t["shots"] == shots, "seed"].unique()) for _, shots in weights}
    seeds = {c: sorted(t.loc[t[config] == c, "pretrain_seed"].unique()) for c, _ in weights}
    for (c, shots), _ in weights.items():
        g = t[(t[config] == c) & (t["shots"] == shots)]
        wide = g.pivot_table(index="pretrain_seed", columns="seed", values=value, aggfunc="mean")
        cells[c, shots] = wide.reindex(index=seeds[c], columns=draws[shots]).to_numpy(float)

    # A replicate is the count of times each seed and each draw was picked (multinomial, as n
    # uniform picks with replacement are), so a cell's resampled mean is a weighted mean:
    # Σ_ij ws_i·A_ij·wd_j / Σ_ij ws_i·[A_ij known]·wd_j — every replicate at once, no loop.
    pick_s = {c: rng.multinomial(len(s), np.full(len(s), 1 / len(s)), size=n_boot) for c, s in seeds.items()}
    pick_d = {s: rng.multinomial(len(d), np.full(len(d), 1 / len(d)), size=n_boot) for s, d in draws.items()}
    est, boots = 0.0, np.zeros(n_boot)
    for (c, shots), w in weights.items():
        a = cells[c, shots]
        known = np.isfinite(a)
        filled = np.where(known, a, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            est += w * (filled.sum() / known.sum())
            num = np.einsum("bi,ij,bj->b", pick_s[c], filled, pick_d[shots])
            den = np.einsum("bi,ij,bj->b", pick_s[c], known.astype(float), pick_d[shots])
            boots += w * (num / den)
    lo, hi = np.nanpercentile(boots, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Interval(float(est), float(lo), float(hi), min(len(s) for s in seeds.values()), "hierarchical bootstrap")
