"""Pure numerical pieces of the analysis: seed aggregates, the saturation fit, size-curve inversion.

Nothing here reads MLflow; every function takes arrays or frames and returns numbers, so each is
tested on planted ground truth. Bootstraps take an explicit ``seed``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats

CI_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------
# Seeds → mean ± 95% CI


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of the 95% Student-t confidence interval, and n (half-width NaN for n < 2)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), 1
    half = stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * v.std(ddof=1) / np.sqrt(n)
    return float(v.mean()), float(half), n


def aggregate(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per group of ``by``: ``mean``, ``ci`` (95% half-width), ``n`` runs (seeds) of ``value``."""
    if df.empty:
        return pd.DataFrame(columns=[*by, "mean", "ci", "n"])
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        m, h, n = mean_ci(g[value])
        rows.append((*key, m, h, n))
    return pd.DataFrame(rows, columns=[*by, "mean", "ci", "n"])


def percentile_ci(samples) -> tuple[float, float]:
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(s, [50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Abnar et al.: downstream error as a saturating power of upstream error


def saturation(e_us, k, alpha, e_ir):
    """``e_DS = k · e_US^α + e_IR`` (errors, 1 − accuracy); e_IR is the irreducible downstream error."""
    return k * np.power(e_us, alpha) + e_ir


def fit_saturation(us_acc, ds_acc, p0=None) -> tuple[float, float, float]:
    """Least-squares (k, α, e_IR) from upstream and downstream accuracies; NaNs if < 3 points.

    Bounds: k ≥ 0, 0.05 ≤ α ≤ 10, 0 ≤ e_IR ≤ 1. Several starting points (or just ``p0``, as the
    bootstrap does from the point estimate); the best fit wins.
    """
    e_us, e_ds = 1 - np.asarray(us_acc, float), 1 - np.asarray(ds_acc, float)
    ok = np.isfinite(e_us) & np.isfinite(e_ds)
    e_us, e_ds = e_us[ok], e_ds[ok]
    if len(e_us) < 3:
        return (float("nan"),) * 3
    best, best_sse = None, np.inf
    span = max(float(e_ds.max() - e_ds.min()), 1e-3)
    starts = (
        [p0]
        if p0 is not None
        else [(span / max(float(e_us.max()) ** a, 1e-6), a, max(float(e_ds.min()) * 0.8, 0.0)) for a in (0.5, 1.0, 2.0)]
    )
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = optimize.curve_fit(
                    saturation,
                    e_us,
                    e_ds,
                    p0=np.clip(p0, [0, 0.05, 0], [10, 10, 1]),
                    bounds=([0, 0.05, 0], [10, 10, 1]),
                    maxfev=5000,
                )
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((saturation(e_us, *p) - e_ds) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    return tuple(float(x) for x in best) if best is not None else (float("nan"),) * 3


def upper_hull(x, y) -> np.ndarray:
    """Indices of the upper convex hull of the points, left to right, up to its highest point.

    This is Abnar et al.'s frontier: for each upstream accuracy, the best downstream accuracy any
    run reached, made convex. The part right of the highest point is dropped, since the saturating
    curve never decreases.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = [i for i in np.lexsort((-y, x)) if np.isfinite(x[i]) and np.isfinite(y[i])]
    hull: list[int] = []
    last_x = None
    for i in idx:
        if x[i] == last_x:  # same x: the highest one came first
            continue
        last_x = x[i]
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross >= 0:  # b lies on or below the segment a–i
                hull.pop()
            else:
                break
        hull.append(i)
    if not hull:
        return np.zeros(0, dtype=int)
    top = int(np.argmax(y[hull]))
    return np.asarray(hull[: top + 1], dtype=int)


def pareto_front(x, y) -> np.ndarray:
    """Indices of the points no other point beats on both axes (higher or equal x and higher y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep, best = [], -np.inf
    for i in np.lexsort((-y, -x)):  # right to left; at equal x the highest first
        if np.isfinite(y[i]) and y[i] > best:
            keep.append(i)
            best = y[i]
    return np.asarray(sorted(keep, key=lambda i: x[i]), dtype=int)


def fit_with_ci(us_acc, ds_acc, on_hull: bool, n_boot: int = 200, seed: int = 0) -> dict:
    """Saturation fit on the upper hull (``on_hull``) or on all points, with bootstrap 95% CIs.

    The bootstrap resamples all points with replacement and, for the hull fit, recomputes the hull.
    """
    us, ds = np.asarray(us_acc, float), np.asarray(ds_acc, float)
    pick = upper_hull(us, ds) if on_hull else np.arange(len(us))
    k, alpha, e_ir = fit_saturation(us[pick], ds[pick])
    rng = np.random.default_rng(seed)
    boots = []
    if np.isfinite(k):
        for _ in range(n_boot):
            i = rng.integers(0, len(us), len(us))
            j = i[upper_hull(us[i], ds[i])] if on_hull else i
            boots.append(fit_saturation(us[j], ds[j], p0=(k, alpha, e_ir)))
    boots = np.asarray(boots, float).reshape(-1, 3)
    out = {"points": int(len(us)), "fit_points": int(len(pick)), "k": k, "alpha": alpha, "e_ir": e_ir}
    for col, name in enumerate(("k", "alpha", "e_ir")):
        out[f"{name}_ci"] = list(percentile_ci(boots[:, col])) if len(boots) else [float("nan")] * 2
    return out


def heldout_check(us_acc, ds_acc, train_fraction: float = 0.8) -> dict:
    """Fit on the lower-upstream ``train_fraction`` of the points, predict the rest.

    The held-out targets are the Pareto front of the held-out points (runs no other held-out run
    beats on both accuracies: the best downstream accuracy reached there, which is what the fit
    claims to predict); the score is the RMSE of downstream error.
    Returns the RMSE for the hull fit and for the all-points fit.
    """
    us, ds = np.asarray(us_acc, float), np.asarray(ds_acc, float)
    order = np.argsort(us, kind="stable")
    cut = int(np.floor(train_fraction * len(us)))
    train, test = order[:cut], order[cut:]
    targets = test[pareto_front(us[test], ds[test])] if len(test) else test
    out = {"train_points": int(len(train)), "heldout_points": int(len(test)), "heldout_targets": int(len(targets))}
    for name, on_hull in (("hull", True), ("all_points", False)):
        pick = train[upper_hull(us[train], ds[train])] if on_hull else train
        params = fit_saturation(us[pick], ds[pick])
        if len(targets) and np.isfinite(params[0]):
            err = saturation(1 - us[targets], *params) - (1 - ds[targets])
            out[f"{name}_rmse"] = float(np.sqrt(np.mean(err**2)))
        else:
            out[f"{name}_rmse"] = float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Entezari et al.: inverting accuracy-vs-size curves


def size_to_reach(sizes, acc, target: float) -> float:
    """Pretraining size at which the curve reaches ``target`` accuracy; NaN outside the curve.

    The curve is made monotone (running maximum over increasing size) and interpolated linearly
    in log size; nothing is extrapolated.
    """
    s, a = np.asarray(sizes, float), np.asarray(acc, float)
    ok = np.isfinite(s) & np.isfinite(a) & (s > 0)
    order = np.argsort(s[ok])
    ls, a = np.log(s[ok][order]), np.maximum.accumulate(a[ok][order])
    if len(a) == 0 or not np.isfinite(target) or target > a[-1] or target < a[0]:
        return float("nan")
    i = int(np.argmax(a >= target))
    if i == 0:
        return float(np.exp(ls[0]))
    t = (target - a[i - 1]) / (a[i] - a[i - 1])
    return float(np.exp(ls[i - 1] + t * (ls[i] - ls[i - 1])))


def size_ratios(sizes_a, acc_a, sizes_b, acc_b) -> np.ndarray:
    """For each point of curve B: (size A needs to reach B's accuracy there) / (B's size)."""
    return np.asarray([size_to_reach(sizes_a, acc_a, t) / n for n, t in zip(sizes_b, acc_b)], float)


def data_multiplier(sizes_a, acc_a, sizes_b, acc_b) -> tuple[float, int]:
    """How many times more data of A matches B: geometric mean of the matched size ratios, and
    how many of B's points A's curve could match (0 → NaN)."""
    r = size_ratios(sizes_a, acc_a, sizes_b, acc_b)
    r = r[np.isfinite(r) & (r > 0)]
    return (float(np.exp(np.mean(np.log(r)))) if len(r) else float("nan")), int(len(r))


def _curve(runs: pd.DataFrame, size: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    g = runs.groupby(size)[value].mean()
    return g.index.to_numpy(float), g.to_numpy(float)


def _groups(runs: pd.DataFrame, size: str, value: str) -> tuple[np.ndarray, list[np.ndarray]]:
    g = runs.groupby(size)[value]
    return np.asarray([float(s) for s, _ in g]), [v.to_numpy(float) for _, v in g]


def _resample(groups, rng) -> tuple[np.ndarray, np.ndarray]:
    sizes, values = groups
    return sizes, np.asarray([v[rng.integers(0, len(v), len(v))].mean() for v in values])


def multiplier_with_ci(
    runs_a: pd.DataFrame, runs_b: pd.DataFrame, size: str, value: str, n_boot: int = 200, seed: int = 0
) -> dict:
    """:func:`data_multiplier` on seed means, with a bootstrap 95% CI that resamples seeds at each size."""
    m, matched = data_multiplier(*_curve(runs_a, size, value), *_curve(runs_b, size, value))
    rng = np.random.default_rng(seed)
    ga, gb = _groups(runs_a, size, value), _groups(runs_b, size, value)
    boots = (
        [data_multiplier(*_resample(ga, rng), *_resample(gb, rng))[0] for _ in range(n_boot)] if np.isfinite(m) else []
    )
    lo, hi = percentile_ci(boots)
    return {"multiplier": m, "ci": [lo, hi], "matched_points": matched}


def iso_accuracy(clean: pd.DataFrame, noisy: pd.DataFrame, size: str, value: str) -> pd.DataFrame:
    """For each clean size n: the noisy size with the same accuracy, and the ratio to n."""
    cs, ca = _curve(clean, size, value)
    ns, na = _curve(noisy, size, value)
    need = np.asarray([size_to_reach(ns, na, t) for t in ca], float)
    return pd.DataFrame(
        {"clean_size": cs, "clean_accuracy": ca, "noisy_size_needed": need, "noisy_per_clean": need / cs}
    )


# ---------------------------------------------------------------------------------------------
# Abnar et al.: is e_IR above zero? A profile-likelihood interval, no bound on e_IR.

ALPHA_RANGE = (0.05, 10.0)
MIN_HULL_POINTS = 5


def e_ir_profile(us_acc, ds_acc, n_alpha: int = 240, n_e_ir: int = 1601) -> dict:
    """e_IR of ``e_DS = k·e_US^α + e_IR`` with a 95% profile-likelihood interval.

    For each e_IR on a fine grid the sum of squares is minimised over α (a log grid on
    ``ALPHA_RANGE``) and k ≥ 0 (closed form for a given α); e_IR itself is *not* bounded at 0,
    so an interval's lower end at 0 is a result, not the fit's bound. The interval is
    {e_IR : (SSE(e_IR) − SSE_min) / (SSE_min / (n − 3)) ≤ F(0.95; 1, n − 3)}, the F
    calibration of a likelihood-ratio test against a model with e_IR fixed (e_IR = 0: a pure power
    law). ``alpha_at_bound`` says α̂ sits at an end of its range, where nothing is evidence.
    Needs MIN_HULL_POINTS points (else NaN and ``points``)."""
    e_us, e_ds = 1 - np.asarray(us_acc, float), 1 - np.asarray(ds_acc, float)
    ok = np.isfinite(e_us) & np.isfinite(e_ds) & (e_us > 0)
    e_us, e_ds = e_us[ok], e_ds[ok]
    n = len(e_us)
    nan = float("nan")
    out = {"points": n, "e_ir": nan, "ci_low": nan, "ci_high": nan, "k": nan, "alpha": nan, "alpha_at_bound": False}
    if n < MIN_HULL_POINTS:
        return out
    alphas = np.geomspace(*ALPHA_RANGE, n_alpha)
    grid = np.linspace(float(e_ds.min()) - 1.0, float(e_ds.min()) + 0.1, n_e_ir)
    x = e_us[None, :] ** alphas[:, None]  # [alpha x points]
    xx = (x**2).sum(axis=1)  # [alpha]
    y = e_ds[None, :] - grid[:, None]  # [e_ir x points]
    xy = y @ x.T  # [e_ir x alpha]
    k = np.clip(xy / xx[None, :], 0.0, None)
    sse = (y**2).sum(axis=1)[:, None] - 2 * k * xy + k**2 * xx[None, :]
    best_alpha = sse.argmin(axis=1)
    profile = sse[np.arange(len(grid)), best_alpha]
    i = int(profile.argmin())
    sse_min = max(float(profile[i]), 1e-18)
    cut = sse_min * (1 + stats.f.ppf(0.95, 1, n - 3) / (n - 3))
    inside = np.flatnonzero(profile <= cut)
    a = int(best_alpha[i])
    out.update(
        e_ir=float(grid[i]),
        ci_low=float(grid[inside.min()]) if inside.min() > 0 else float("-inf"),
        ci_high=float(grid[inside.max()]) if inside.max() < len(grid) - 1 else float("inf"),
        k=float(k[i, a]),
        alpha=float(alphas[a]),
        alpha_at_bound=a in (0, n_alpha - 1),
    )
    return out


def e_ir_batch(us_acc, ds_acc, use, n_alpha: int = 240) -> np.ndarray:
    """e_IR of ``e_DS = k·e_US^α + e_IR`` for many point sets at once (one per row of the
    ``[sets x points]`` arrays; ``use`` marks the points of each set, e.g. its hull).

    The same least squares as :func:`e_ir_profile` (α on its log grid, k ≥ 0, e_IR unbounded),
    with k and e_IR in closed form for each α instead of e_IR on a grid: a bootstrap refits
    hundreds of sets in milliseconds. NaN for a set with fewer than MIN_HULL_POINTS points."""
    e_us, e_ds = 1 - np.asarray(us_acc, float), 1 - np.asarray(ds_acc, float)
    w = (np.asarray(use, bool) & np.isfinite(e_us) & np.isfinite(e_ds) & (e_us > 0)).astype(float)
    e_us, e_ds = np.where(w > 0, e_us, 1.0), np.where(w > 0, e_ds, 0.0)
    alphas = np.geomspace(*ALPHA_RANGE, n_alpha)
    x = e_us[:, None, :] ** alphas[None, :, None]  # [sets x alpha x points]
    w3, y = w[:, None, :], e_ds[:, None, :]
    s0 = w.sum(axis=1)[:, None]
    sx, sy = (w3 * x).sum(axis=2), (w * e_ds).sum(axis=1)[:, None]
    sxx, sxy, syy = (w3 * x * x).sum(axis=2), (w3 * x * y).sum(axis=2), (w * e_ds**2).sum(axis=1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        vxx, vxy = sxx - sx**2 / s0, sxy - sx * sy / s0
        k = np.clip(np.where(vxx > 0, vxy / vxx, 0.0), 0.0, None)
        e_ir = (sy - k * sx) / s0
    sse = syy + k**2 * sxx + s0 * e_ir**2 - 2 * k * sxy - 2 * e_ir * sy + 2 * k * e_ir * sx
    best = np.nanargmin(np.where(np.isfinite(sse), sse, np.inf), axis=1)
    out = e_ir[np.arange(len(w)), best]
    return np.where(s0[:, 0] >= MIN_HULL_POINTS, out, np.nan)


def paired_e_ir_difference_sd(us, ds_a, ds_b, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap SD of e_IR(a) − e_IR(b), two hull fits on the same configurations.

    ``us``, ``ds_a``, ``ds_b``: ``[configurations x runs]`` per-pretraining-run accuracies (NaN
    padding; run j of a configuration is the same checkpoint in all three). Each replicate
    resamples every configuration's runs with replacement — the same runs for both fits, so
    what the fits share (upstream accuracies, a checkpoint's seed effect at both shots) stays
    shared — and refits both (:func:`e_ir_batch`) on the replicate's means of the configurations
    that form each fit's upper hull in the data. Runs, not configurations, are resampled, and the
    hulls' configurations are kept: a resample of configurations repeats points, and a hull
    recomputed on a replicate often falls under MIN_HULL_POINTS. The variance is scaled by
    r/(r − 1), r the fewest runs of a configuration, since a resample of r runs varies less than
    a fresh draw. NaN with fewer than 2 runs in a configuration.
    """
    us, ds_a, ds_b = (np.asarray(v, float) for v in (us, ds_a, ds_b))
    ok = np.isfinite(us) & np.isfinite(ds_a) & np.isfinite(ds_b)
    runs = ok.sum(axis=1)
    keep = runs > 0
    us, ds_a, ds_b, ok, runs = us[keep], ds_a[keep], ds_b[keep], ok[keep], runs[keep]
    if len(runs) == 0 or runs.min() < 2:
        return float("nan")
    order = np.argsort(~ok, axis=1, kind="stable")  # each configuration's runs first
    us, ds_a, ds_b = (np.take_along_axis(v, order, axis=1) for v in (us, ds_a, ds_b))
    rng = np.random.default_rng(seed)
    width = us.shape[1]
    pick = (rng.random((n_boot, len(runs), width)) * runs[None, :, None]).astype(int)
    inside = np.arange(width)[None, None, :] < runs[None, :, None]
    rows = np.arange(len(runs))[None, :, None]

    def means(v):
        return np.where(inside, v[rows, pick], 0.0).sum(axis=2) / runs[None, :]

    m_us, m_a, m_b = means(us), means(ds_a), means(ds_b)
    mean_us = np.where(inside[0], us, 0.0).sum(axis=1) / runs
    hulls = []
    for v in (ds_a, ds_b):
        on = np.zeros(len(runs), bool)
        on[upper_hull(mean_us, np.where(inside[0], v, 0.0).sum(axis=1) / runs)] = True
        hulls.append(np.broadcast_to(on, m_us.shape))
    d = e_ir_batch(m_us, m_a, hulls[0]) - e_ir_batch(m_us, m_b, hulls[1])
    d = d[np.isfinite(d)]
    if len(d) < n_boot // 2:
        return float("nan")
    r = int(runs.min())
    return float(d.std(ddof=1) * np.sqrt(r / (r - 1)))
