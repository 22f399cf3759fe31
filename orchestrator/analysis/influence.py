"""Jain et al.'s source-class influence, in numpy.

Many models are pretrained on random subsets of the source's classes; each is evaluated on the
same target examples. The influence of class c on example j is the mean output (e.g. the
probability of the correct label) of models that included c minus that of models that excluded
it, with the standard error of that difference (Welch). The influence on the task is the same
difference for the mean output over all examples.

Whether an influence is real is asked of the design itself, not of a normal approximation:

- :func:`permutation_test`: per (class, example) a p-value from permuting which model trained on
  which subset (the rows of the mask), the null Jain et al. use to find leaked and misleading
  examples; and, per class, for how many examples it is the top influencer, against the same null.
- :func:`split_half_reliability`: how well the class ranking replicates on disjoint halves of the
  models (Spearman–Brown corrected): about 0 when no class matters, whatever the number of models.
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


PERMUTATIONS = 999  # default permutations: p-values resolve down to 1/1000
FAMILY_ALPHA = 0.01  # an example counts as found for a class where its family-wise p is below this
SPLITS = 50  # default random half-splits of split_half_reliability


@dataclass(frozen=True)
class PermutationTest:
    """Per (class, example) influence with permutation p-values, and the per-class top-influencer counts.

    ``p`` is the two-sided p-value of one (class, example) pair taken alone: ``(1 + #{permutations
    whose |z| ≥ the observed |z|}) / (1 + permutations)``, where z is the influence over its
    permutation-invariant scale ``sd_j · sqrt(1/n_in + 1/n_out)``. ``p_family`` controls the
    family-wise error over **every** (class, example) pair tested (Westfall–Young single-step
    max-|z|: the observed |z| against the largest |z| of each permutation): call an example leaked
    or misleading for a class where ``p_family < α``, and at most α of studies where no class
    matters anywhere call any. ``p`` is for one pair chosen in advance.
    """

    influence: np.ndarray  # [classes × examples] mean(with) − mean(without); NaN for untested classes
    p: np.ndarray  # [classes × examples] per-pair permutation p-value (NaN for untested classes)
    p_family: np.ndarray  # [classes × examples] family-wise p-value over all tested pairs
    top_count: np.ndarray  # [classes] examples whose largest positive z is this class's
    top_expected: np.ndarray  # [classes] mean of that count over the permutations
    top_p: np.ndarray  # [classes] P(count under the null ≥ observed), one-sided
    permutations: int
    seed: int

    def per_example(self, classes, examples) -> pd.DataFrame:
        """One row per (class, example): ``class, example, influence, p, p_family``."""
        c, e = self.influence.shape
        return pd.DataFrame(
            {
                "class": np.repeat(np.asarray(classes, dtype=object), e),
                "example": np.tile(np.asarray(examples), c),
                "influence": self.influence.ravel(),
                "p": self.p.ravel(),
                "p_family": self.p_family.ravel(),
            }
        )

    def class_summary(self, classes, alpha: float = FAMILY_ALPHA) -> pd.DataFrame:
        """One row per class: for how many examples it is the top influencer, that count's mean under
        the null and its permutation p-value; on how many examples its influence is significant
        family-wise (``p_family < alpha``: the examples found for it, with at most ``alpha`` of
        studies where no class matters finding any) and its smallest ``p_family``; most top
        examples first."""
        with np.errstate(invalid="ignore"):
            found = (self.p_family < alpha).sum(axis=1)
        df = pd.DataFrame(
            {
                "class": list(classes),
                "top_examples": self.top_count,
                "top_examples_null": self.top_expected,
                "p": self.top_p,
                "found_examples": found,
                "min_p_family": np.nanmin(np.where(np.isnan(self.p_family), np.inf, self.p_family), axis=1)
                if self.p_family.size
                else np.full(len(self.top_count), np.nan),
                "permutations": self.permutations,
            }
        )
        return df.sort_values("top_examples", ascending=False, kind="stable").reset_index(drop=True)


def permutation_test(
    masks, outputs, permutations: int = PERMUTATIONS, seed: int = 0, chunk_bytes: int = 2**26
) -> PermutationTest:
    """Per-example influence of every class with a mask-permutation null (Jain et al. 2022).

    ``masks``: bool [models × classes]; ``outputs``: float [models × examples] (NaN: no output;
    it counts as the example's mean over models, which pulls its influence toward 0). The null
    permutes the rows of ``masks`` (which model trained on which subset) ``permutations`` times,
    drawn from ``seed``: valid when models are exchangeable but for their subsets, as a datamodel
    sweep's are. Column c of a permuted mask is a permutation of column c, so ``p`` of class c
    tests "class c's presence is independent of the example's output", whatever other classes do.
    Vectorised: each chunk of permutations is one batched matmul of at most ``chunk_bytes``.
    """
    m = np.asarray(masks, dtype=bool)
    y = np.asarray(outputs, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if m.shape[0] != y.shape[0]:
        raise ValueError(f"masks have {m.shape[0]} models, outputs {y.shape[0]}")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    n, c = m.shape
    e = y.shape[1]
    valid = np.isfinite(y)
    fill = np.where(valid, y, 0.0).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
    y = np.where(valid, y, fill)
    yc = y - y.mean(axis=0)
    sd = yc.std(axis=0, ddof=1) if n > 1 else np.zeros(e)
    n_in = m.sum(axis=0)
    n_out = n - n_in
    tested = (n_in > 0) & (n_out > 0)
    prod = np.maximum(n_in * n_out, 1).astype(float)
    # With centred outputs, mean(with) − mean(without) = S · n / (n_in · n_out), S = Σ_with y.
    to_influence = np.where(tested, n / prod, np.nan)[:, None]
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    to_z = np.where(tested, np.sqrt(n / prod), 0.0)[:, None] * inv_sd[None, :]
    varies = sd > 0
    mf = m.astype(float)
    s_obs = mf.T @ yc
    z_obs = s_obs * to_z
    bar = np.abs(z_obs) * (1 - 1e-9)  # ties up to float rounding count as exceedances
    top_obs = _top_counts(np.where(tested[:, None], z_obs, -np.inf)[None], varies, c)[0]

    rng = np.random.default_rng(seed)
    exceed = np.zeros((c, e))
    max_null = np.empty(permutations)
    top_null = np.empty((permutations, c))
    chunk = max(1, int(chunk_bytes // (8 * max(c * e, n * c, 1))))
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        rows = np.argsort(rng.random((b, n)), axis=1)  # b independent permutations of the models
        # One 2-D matmul (BLAS) for the chunk: [b·classes × models] @ [models × examples].
        permuted = np.ascontiguousarray(mf[rows].transpose(0, 2, 1)).reshape(b * c, n)
        z = (permuted @ yc).reshape(b, c, e) * to_z  # [b × classes × examples]
        exceed += (np.abs(z) >= bar).sum(axis=0)
        max_null[start : start + b] = np.abs(z).reshape(b, -1).max(axis=1) if c * e else 0.0
        top_null[start : start + b] = _top_counts(np.where(tested[:, None], z, -np.inf), varies, c)
    p = (1 + exceed) / (1 + permutations)
    ranked = np.sort(max_null)
    family = permutations - np.searchsorted(ranked, bar, side="left")
    p_family = (1 + family) / (1 + permutations)
    untested = ~tested[:, None] | np.zeros((1, e), dtype=bool)
    top_p = (1 + (top_null >= top_obs).sum(axis=0)) / (1 + permutations)
    return PermutationTest(
        influence=s_obs * to_influence,
        p=np.where(untested, np.nan, p),
        p_family=np.where(untested, np.nan, p_family),
        top_count=np.where(tested, top_obs, 0).astype(int),
        top_expected=np.where(tested, top_null.mean(axis=0), np.nan),
        top_p=np.where(tested, top_p, np.nan),
        permutations=permutations,
        seed=seed,
    )


def _top_counts(z: np.ndarray, varies: np.ndarray, classes: int) -> np.ndarray:
    """[b × classes]: per stack of z [b × classes × examples], how many examples (of those whose
    output varies) have each class as their largest z."""
    top = np.argmax(z[:, :, varies], axis=1)  # [b × examples]
    b = top.shape[0]
    return np.bincount((top + classes * np.arange(b)[:, None]).ravel(), minlength=b * classes).reshape(b, classes)


def split_half_reliability(masks, outputs, splits: int = SPLITS, seed: int = 0) -> pd.DataFrame:
    """How well the task-influence ranking of the classes replicates, from disjoint halves of the models.

    Each of ``splits`` seeded random splits cuts the models into two disjoint halves; the class
    influences on the task (:func:`task_influence`) of the two halves are correlated (Pearson,
    across classes) and Spearman–Brown corrected to the full number of models, ``2r / (1 + r)``.
    One row: ``models, splits, half_r`` (mean correlation of the halves), ``reliability`` (its
    correction), ``reliability_low`` / ``reliability_high`` (the corrected 2.5th / 97.5th percentiles
    over the splits: how much the answer moves with the split, not a confidence interval). About 0
    when no class matters, near 1 when the ranking is stable; NaN with fewer than 4 models or 3
    classes to correlate.
    """
    m = np.asarray(masks, dtype=bool)
    y = np.asarray(outputs, dtype=float)
    y = np.nanmean(y, axis=1) if y.ndim == 2 else y
    n = len(m)
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(splits if n >= 4 else 0):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2 : 2 * (n // 2)]
        ia, ib = task_influence(m[a], y[a]).values[:, 0], task_influence(m[b], y[b]).values[:, 0]
        ok = np.isfinite(ia) & np.isfinite(ib)
        if ok.sum() >= 3 and ia[ok].std() > 0 and ib[ok].std() > 0:
            rs.append(float(np.corrcoef(ia[ok], ib[ok])[0, 1]))
    r = np.asarray(rs)
    if not len(r):
        nan = float("nan")
        return pd.DataFrame([{"models": n, "splits": 0, "half_r": nan, **dict.fromkeys(_RELIABILITY, nan)}])
    # Spearman–Brown is monotone, so the corrected percentiles are the corrected r's percentiles;
    # the mean is corrected after averaging (averaging corrected values overweights r near −1).
    values = _spearman_brown(np.array([r.mean(), *np.percentile(r, [2.5, 97.5])]))
    return pd.DataFrame([{"models": n, "splits": len(r), "half_r": float(r.mean()), **dict(zip(_RELIABILITY, values))}])


_RELIABILITY = ("reliability", "reliability_low", "reliability_high")


def _spearman_brown(r: np.ndarray) -> np.ndarray:
    """The reliability of the full set of models from the correlation r of its two halves."""
    return 2 * r / (1 + r)
