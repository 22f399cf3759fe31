"""The report's tables, computed from the transfer frame of :mod:`orchestrator.analysis.frame`.

Pure functions of DataFrames (one row per finished transfer run, joined with its pretraining run).
A *curve* is one (source, method[, model]) series; seeds (pretraining × transfer) are aggregated
to mean ± 95% CI with n.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from orchestrator.analysis import fits
from orchestrator.analysis.frame import PRETRAIN_RUN_ID, PRETRAIN_SEED
from orchestrator.analysis.memo import Memo
from orchestrator.records.schema import (
    METRIC_ACCURACY,
    METRIC_NUM_TRAIN_SAMPLES,
    METRIC_UPSTREAM_ACCURACY,
    PARAM_CLASS_FRACTION,
)
from trainers.protocols import FINAL_LAYER

SIZE, ACC = METRIC_NUM_TRAIN_SAMPLES, METRIC_ACCURACY
SETTING = ["task", "protocol"]


def final_layer(t: pd.DataFrame) -> pd.DataFrame:
    """Runs that read the backbone's final representation: a layer-wise study's earlier layers are
    compared in :func:`best_layer_table`, not mixed into the curves and fits. A frame without a
    final-layer run (only named layers) is returned whole."""
    final = t["layer"].astype(str).isin(["", FINAL_LAYER])
    return t[final] if final.any() else t


def series_keys(t: pd.DataFrame) -> list[str]:
    """What tells curves apart: source and method, and the model when the study varies it."""
    return ["source", "method"] + (["model"] if t["model"].nunique() > 1 else [])


def _all_classes(t: pd.DataFrame) -> pd.DataFrame:
    """Runs that trained on the largest class fraction (Jain-style subsets are not size curves)."""
    return t[t[PARAM_CLASS_FRACTION] == t.groupby(series_keys(t))[PARAM_CLASS_FRACTION].transform("max")]


def reference_runs(t: pd.DataFrame) -> pd.DataFrame:
    """Per curve: the runs at its largest pretraining size and lowest label noise."""
    t = _all_classes(t)
    keys = series_keys(t)
    size = t[SIZE].fillna(np.inf)
    g = t.assign(_size=size).groupby(keys)
    return t[(size == g["_size"].transform("max")) & (t["label_noise"] == g["label_noise"].transform("min"))]


def shots_curves(t: pd.DataFrame) -> pd.DataFrame:
    """Accuracy vs shots (few-shot settings only) per curve, at each curve's reference runs."""
    few = reference_runs(t)
    few = few[np.isfinite(few["shots_n"])]
    return fits.aggregate(few, [*SETTING, *series_keys(t), "shots_n"], ACC)


def size_curves(t: pd.DataFrame) -> pd.DataFrame:
    """Accuracy vs pretraining size per curve and shots, at each curve's lowest label noise."""
    t = _all_classes(t)
    t = t[(t["label_noise"] == t.groupby(series_keys(t))["label_noise"].transform("min")) & np.isfinite(t[SIZE])]
    return fits.aggregate(t, [*SETTING, *series_keys(t), "shots", "shots_n", SIZE], ACC)


def spread_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Spread of the curves' means across sources, per task and shots."""
    rows = []
    for (task, protocol, shots), g in curves.groupby([*SETTING, "shots_n"]):
        m = g["mean"].to_numpy(float)
        rows.append(
            (
                task,
                protocol,
                shots,
                len(m),
                float(np.std(m, ddof=1)) if len(m) > 1 else np.nan,
                float(m.max() - m.min()),
            )
        )
    return pd.DataFrame(rows, columns=[*SETTING, "shots_n", "sources", "std_across_sources", "range_across_sources"])


def iso_accuracy_table(t: pd.DataFrame) -> pd.DataFrame:
    """How many noisy samples equal n clean ones: per curve, shots and noise level > 0."""
    t = _all_classes(t)
    t = t[np.isfinite(t[SIZE])]
    out = []
    for key, g in t.groupby([*SETTING, *series_keys(t), "shots"]):
        clean = g[g["label_noise"] == 0]
        if clean.empty:
            continue
        for noise, noisy in g[g["label_noise"] > 0].groupby("label_noise"):
            if noisy[SIZE].nunique() < 2:
                continue
            iso = fits.iso_accuracy(clean, noisy, SIZE, ACC)
            for col, v in zip([*SETTING, *series_keys(t), "shots"], key):
                iso[col] = v
            iso["label_noise"] = noise
            out.append(iso)
    cols = [
        *SETTING,
        *series_keys(t),
        "shots",
        "label_noise",
        "clean_size",
        "clean_accuracy",
        "noisy_size_needed",
        "noisy_per_clean",
    ]
    return pd.concat(out)[cols].reset_index(drop=True) if out else pd.DataFrame(columns=cols)


def multiplier_table(t: pd.DataFrame, n_boot: int = 200, seed: int = 0, memo: Memo | None = None) -> pd.DataFrame:
    """ "N× more data of source A to match source B at k shots", with a bootstrap 95% CI.

    ``memo``: a :class:`Memo` that keeps the bootstraps by input digest (default: none kept)."""
    memo = memo or Memo(None)
    t = _all_classes(t)
    t = t[np.isfinite(t[SIZE])]
    t = t[t["label_noise"] == t.groupby(series_keys(t))["label_noise"].transform("min")]
    t = t.sort_values([SIZE, PRETRAIN_SEED, "seed", ACC])  # bootstrap draws must not depend on search order
    rows = []
    for (task, protocol, method, shots), g in t.groupby([*SETTING, "method", "shots"]):
        curves = {s: c for s, c in g.groupby("source") if c[SIZE].nunique() >= 2}
        for a, b in itertools.permutations(sorted(curves), 2):
            r = memo(fits.multiplier_with_ci, curves[a], curves[b], SIZE, ACC, n_boot=n_boot, seed=seed)
            rows.append((task, protocol, method, shots, a, b, r["multiplier"], *r["ci"], r["matched_points"]))
    return pd.DataFrame(
        rows,
        columns=[
            *SETTING,
            "method",
            "shots",
            "source_a",
            "source_b",
            "multiplier",
            "ci_low",
            "ci_high",
            "matched_points",
        ],
    )


def us_ds_points(t: pd.DataFrame) -> pd.DataFrame:
    """One point per pretraining run and (task, protocol, shots): upstream vs mean downstream accuracy."""
    keys = [PRETRAIN_RUN_ID, *SETTING, "shots", "shots_n"]
    g = t.groupby(keys, as_index=False).agg(
        accuracy=(ACC, "mean"),
        upstream_accuracy=(METRIC_UPSTREAM_ACCURACY, "first"),
        source=("source", "first"),
        seeds=(ACC, "size"),
    )
    return g[np.isfinite(g["upstream_accuracy"]) & np.isfinite(g["accuracy"])]


def saturation_tables(
    points: pd.DataFrame, n_boot: int = 200, seed: int = 0, memo: Memo | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Saturation fits (hull and all points, bootstrap CIs) and the held-out check per setting.

    ``memo``: a :class:`Memo` that keeps the fits by input digest (default: none kept)."""
    memo = memo or Memo(None)
    fit_rows, check_rows = [], []
    for (task, protocol, shots, shots_n), g in points.groupby([*SETTING, "shots", "shots_n"]):
        g = g.sort_values(
            ["upstream_accuracy", "accuracy", PRETRAIN_RUN_ID]
        )  # bootstrap draws must not depend on search order
        us, ds = g["upstream_accuracy"].to_numpy(float), g["accuracy"].to_numpy(float)
        for fit_on in ("hull", "all_points"):
            f = memo(fits.fit_with_ci, us, ds, on_hull=fit_on == "hull", n_boot=n_boot, seed=seed)
            fit_rows.append(
                {
                    "task": task,
                    "protocol": protocol,
                    "shots": shots,
                    "shots_n": shots_n,
                    "fit_on": fit_on,
                    "points": f["points"],
                    "fit_points": f["fit_points"],
                    **{
                        f"{p}{s}": v
                        for p in ("k", "alpha", "e_ir")
                        for s, v in (("", f[p]), ("_ci_low", f[f"{p}_ci"][0]), ("_ci_high", f[f"{p}_ci"][1]))
                    },
                }
            )
        check_rows.append(
            {"task": task, "protocol": protocol, "shots": shots, "shots_n": shots_n, **memo(fits.heldout_check, us, ds)}
        )
    return pd.DataFrame(fit_rows), pd.DataFrame(check_rows)


def best_layer_table(t: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per layer and the best layer per (task, protocol, shots); empty without layer-wise runs."""
    lw = t[t["layer"].astype(str) != ""]
    if lw["layer"].nunique() < 2:
        return pd.DataFrame(columns=[*SETTING, "shots", "layer", "mean", "ci", "n", "best"])
    agg = fits.aggregate(lw, [*SETTING, "shots", "layer"], ACC)
    agg["best"] = agg["mean"] == agg.groupby([*SETTING, "shots"])["mean"].transform("max")
    return agg


# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google Sheets
# (``=HYPERLINK(...)`` as a class name); a leading ``'`` makes it text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell that a spreadsheet would run as a formula prefixed with ``'``
    (numbers are left alone: ``-0.5`` in a float column is not text). For CSV output."""
    out = df.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = ["'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v for v in out[column]]
    out.columns = ["'" + c if isinstance(c, str) and c.startswith(_FORMULA_START) else c for c in out.columns]
    return out
