"""The report's figures (matplotlib, Agg backend): tidy frames in, PNG bytes out.

Every figure states n (runs or models per point) in its title; error bars are 95% CIs over seeds
unless a caption says otherwise.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from orchestrator.analysis.fits import saturation

DPI = 80
MAX_SCATTER = 1500  # points drawn per panel; beyond it a seeded sample (the fits use every point)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _n_text(n: pd.Series) -> str:
    n = n[n > 0]
    if n.empty:
        return "n=0"
    lo, hi = int(n.min()), int(n.max())
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def _log_x(ax, values) -> None:
    """Log x axis labelled with the plotted values themselves (1, 5, 10 shots; 1000, 4000
    samples), not matplotlib's 2×10⁰ minor-tick labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    ticks = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    if ticks and len(ticks) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))


def _errorbar(ax, x, agg: pd.DataFrame, label: str, **kw):
    yerr = agg["ci"].fillna(0).to_numpy()
    ax.errorbar(x, agg["mean"], yerr=yerr, marker="o", ms=4, capsize=3, label=label, **kw)


def curves(
    agg: pd.DataFrame, x: str, series: list[str], title: str, xlabel: str, ylabel: str = "accuracy", logx: bool = True
) -> bytes:
    """One line per ``series`` group of an :func:`~orchestrator.analysis.fits.aggregate` frame."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    groups = list(agg.groupby(series, sort=True))
    if "shots_n" in agg and "shots_n" != x:  # 1, 5, 10, full, not 1, 10, 5, full
        groups.sort(key=lambda kg: kg[1]["shots_n"].iloc[0])
    for key, g in groups:
        g = g.sort_values(x)
        label = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        _errorbar(ax, g[x].to_numpy(float), g, label)
    if logx:
        _log_x(ax, agg[x].to_numpy(float))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nmean ± 95% CI over seeds, {_n_text(agg['n'])} runs per point", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def spread(table: pd.DataFrame, title: str) -> bytes:
    """Spread across sources (std and max − min of the curve means) vs shots, per task."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for task, g in table.groupby("task"):
        g = g.sort_values("shots_n")
        ax.plot(g["shots_n"], g["std_across_sources"], marker="o", label=f"{task}: std")
        ax.plot(g["shots_n"], g["range_across_sources"], marker="s", ls="--", label=f"{task}: max − min")
    _log_x(ax, table["shots_n"].to_numpy(float))
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy spread across sources")
    ax.set_title(f"{title}\nover seed means of {_n_text(table['sources'])} sources", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def saturation_panel(points: pd.DataFrame, fits: pd.DataFrame, title: str, seed: int = 0) -> bytes:
    """Downstream vs upstream accuracy, one panel per shots setting, with the hull and both fits."""
    from orchestrator.analysis.fits import upper_hull

    shots = list(dict.fromkeys(points.sort_values("shots_n")["shots"]))
    cols = min(3, len(shots))
    rows = int(np.ceil(len(shots) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, s in zip(axes.flat, shots):
        p = points[points["shots"] == s]
        us, ds = p["upstream_accuracy"].to_numpy(float), p["accuracy"].to_numpy(float)
        shown = rng.choice(len(p), MAX_SCATTER, replace=False) if len(p) > MAX_SCATTER else np.arange(len(p))
        ax.scatter(us[shown], ds[shown], s=8, alpha=0.5, color="0.5", label=f"runs (n={len(p)})")
        h = upper_hull(us, ds)
        ax.plot(us[h], ds[h], "k.", ms=9, label=f"upper hull ({len(h)})")
        grid = np.linspace(np.nanmin(us), 1.0, 100) if len(us) else np.zeros(0)
        for name, style in (("hull", "-"), ("all_points", "--")):
            f = fits[(fits["shots"] == s) & (fits["fit_on"] == name)]
            if len(f) and np.isfinite(f["k"].iloc[0]):
                r = f.iloc[0]
                ax.plot(
                    grid,
                    1 - saturation(1 - grid, r["k"], r["alpha"], r["e_ir"]),
                    style,
                    label=f"fit on {name.replace('_', ' ')}: e_IR={r['e_ir']:.3f}",
                )
        ax.set_title(f"{s}-shot" if s != "full" else "full", fontsize=9)
        ax.set_xlabel("upstream accuracy")
        ax.set_ylabel("downstream accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shots) :]:
        ax.axis("off")
    fig.suptitle(
        f"{title}: e_DS = k·e_US^α + e_IR (one point per pretraining run, mean over transfer seeds)", fontsize=9
    )
    return _png(fig)


def e_ir_vs_shots(fits: pd.DataFrame, title: str) -> bytes:
    """Fitted irreducible error with its bootstrap 95% CI vs shots, per task and fit."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    few = fits[np.isfinite(fits["shots_n"])]
    for (task, fit_on), g in few.groupby(["task", "fit_on"]):
        g = g.sort_values("shots_n")
        lo = (g["e_ir"] - g["e_ir_ci_low"]).clip(lower=0).fillna(0)
        hi = (g["e_ir_ci_high"] - g["e_ir"]).clip(lower=0).fillna(0)
        ax.errorbar(g["shots_n"], g["e_ir"], yerr=[lo, hi], marker="o", capsize=3, label=f"{task}, fit on {fit_on}")
    _log_x(ax, few["shots_n"].to_numpy(float))
    ax.set_xlabel("shots per class")
    ax.set_ylabel("e_IR (irreducible downstream error)")
    ax.set_title(f"{title}\nbootstrap 95% CI, {_n_text(few['points'])} pretraining runs per fit", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def influence_bars(
    ranking: pd.DataFrame, title: str, top: int = 10, output: str = "correct-class probability"
) -> bytes:
    """Most helpful and most harmful classes with ±1.96 SE bars; ``output``: what the influence is on."""
    r = ranking.dropna(subset=["influence"])
    show = pd.concat([r.head(top), r.tail(top)]).drop_duplicates("class").sort_values("influence")
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.22 * len(show) + 1)))
    colors = ["tab:red" if v < 0 else "tab:green" for v in show["influence"]]
    ax.barh(show["class"].astype(str), show["influence"], xerr=1.96 * show["se"].fillna(0), color=colors, capsize=2)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"influence on mean {output} (with − without)")
    n = int(r["models_with"].max() + r["models_without"].max()) if len(r) else 0
    ax.set_title(f"{title}\n±95% CI (1.96 SE), n={n} models", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def counterfactual_plot(agg: pd.DataFrame, title: str) -> bytes:
    """Target accuracy vs K removed classes, one line per arm (K = 0 is the unmodified source)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm, g in agg.groupby("arm"):
        g = g.sort_values("k")
        _errorbar(ax, g["k"].to_numpy(float), g, arm)
    ax.set_xlabel("K classes removed from the source")
    ax.set_ylabel("target accuracy")
    ax.set_title(f"{title}\nmean ± 95% CI over seeds, {_n_text(agg['n'])} runs per point", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
