"""Jain et al.'s source-class influence, in numpy.

Many models are pretrained on random subsets of the source's classes; each is evaluated on the
same target examples. The influence of class c on example j is the mean output (e.g. the
probability of the correct label) of models that included c minus that of models that excluded
it, with the standard error of that difference (Welch). The influence on the task is the same
difference for the mean output over all examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Influence:
    values: np.ndarray  # [classes × examples] mean(included) − mean(excluded)
    se: np.ndarray  # [classes × examples] standard error of the difference
    n_included: np.ndarray  # [classes] models that trained on the class
    n_excluded: np.ndarray  # [classes]


def _group_stats(weights: np.ndarray, y: np.ndarray, valid: np.ndarray):
    """Per class (columns of ``weights``) and example: count, mean and variance of y over models."""
    yz = np.where(valid > 0, y, 0.0)  # missing outputs add nothing to sums nor counts
    n = weights.T @ valid
    s1 = weights.T @ yz
    s2 = weights.T @ yz**2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
    return n, mean, np.maximum(var, 0.0)


def influence(masks, outputs) -> Influence:
    """Influence of each class on each example.

    ``masks``: bool [models × classes], True where the model's pretraining data held the class.
    ``outputs``: float [models × examples]; NaN where a model has no output for an example.
    Classes that every model (or no model) saw get NaN influence.
    """
    m = np.asarray(masks, dtype=bool)
    y = np.asarray(outputs, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if m.shape[0] != y.shape[0]:
        raise ValueError(f"masks have {m.shape[0]} models, outputs {y.shape[0]}")
    valid = np.isfinite(y).astype(float)
    n_in, mean_in, var_in = _group_stats(m.astype(float), y, valid)
    n_out, mean_out, var_out = _group_stats((~m).astype(float), y, valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where((n_in > 0) & (n_out > 0), mean_in - mean_out, np.nan)
        se = np.sqrt(var_in / n_in + var_out / n_out)
    se = np.where(np.isfinite(values), se, np.nan)
    return Influence(values, se, m.sum(0), (~m).sum(0))


def task_influence(masks, outputs) -> Influence:
    """Influence on the task: on each model's mean output over the examples (one column)."""
    y = np.asarray(outputs, dtype=float)
    return influence(masks, np.nanmean(y, axis=1, keepdims=True) if y.ndim == 2 else y)


def ranking(classes: list[str], task: Influence) -> pd.DataFrame:
    """Classes from most helpful (largest positive task influence) to most harmful."""
    df = pd.DataFrame(
        {
            "class": list(classes),
            "influence": task.values[:, 0],
            "se": task.se[:, 0],
            "models_with": task.n_included,
            "models_without": task.n_excluded,
        }
    )
    df = df.sort_values("influence", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def _ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r


def convergence(masks, outputs, steps: int = 8, top: int = 5, seed: int = 0) -> pd.DataFrame:
    """How the class ranking settles as models are added (in a seeded random order).

    For n models out of N, reports the Spearman correlation of the task-influence ranking with the
    ranking from all N, and the share of the top-``top`` helpful and harmful classes it agrees on.
    """
    m = np.asarray(masks, dtype=bool)
    y = np.nanmean(np.asarray(outputs, float), axis=1)
    full = task_influence(m, y).values[:, 0]
    ok = np.isfinite(full)
    order = np.random.default_rng(seed).permutation(len(m))
    top = max(1, min(top, int(ok.sum()) // 2))
    rows = []
    for n in np.unique(np.linspace(max(4, len(m) // steps), len(m), steps).astype(int)):
        part = task_influence(m[order[:n]], y[order[:n]]).values[:, 0]
        both = ok & np.isfinite(part)
        if both.sum() < 3:
            rows.append((int(n), float("nan"), float("nan")))
            continue
        rho = float(np.corrcoef(_ranks(part[both]), _ranks(full[both]))[0, 1])
        f, p = full[both], part[both]
        agree = [
            len(set(np.argsort(-f)[:top]) & set(np.argsort(-p)[:top])),
            len(set(np.argsort(f)[:top]) & set(np.argsort(p)[:top])),
        ]
        rows.append((int(n), rho, sum(agree) / (2 * top)))
    return pd.DataFrame(rows, columns=["models", "spearman_vs_all", "top_agreement"])
