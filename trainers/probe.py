"""The closed-form ridge few-shot probe, as in big_vision's few-shot evaluator.

Features are standardized with the training shots' mean and std, a constant bias feature of
:data:`BIAS_CONSTANT` is appended (so large that the bias is practically unregularized), targets
are one-hot in {-1, +1}, and ridge regression is solved in closed form for every L2 strength of
the grid from one eigendecomposition: of ``XᵀX`` (D×D) when there are at least as many shots as
feature dimensions, else of ``XXᵀ`` (N×N), the usual few-shot case. The L2 strength is chosen by
accuracy on a validation split; the test split is only ever scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIAS_CONSTANT = 100.0
L2_GRID: tuple[float, ...] = tuple(2.0**i for i in range(-10, 21, 2))


@dataclass
class RidgeCache:
    """Everything the closed-form solution needs, independent of the L2 strength."""

    mean: np.ndarray
    std: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    x: np.ndarray  # whitened, bias-padded training features
    y: np.ndarray  # {-1, +1} targets
    primal: bool


def _whiten(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, dtype=np.float64) - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def precompute(x: np.ndarray, y: np.ndarray, num_classes: int) -> RidgeCache:
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0, keepdims=True)
    std = x.std(0, keepdims=True) + 1e-5
    xw = _whiten(x, mean, std)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    n, d = xw.shape
    primal = n >= d
    gram = xw.T @ xw if primal else xw @ xw.T
    eigvals, eigvecs = np.linalg.eigh(gram)
    return RidgeCache(mean, std, eigvals, eigvecs, xw, targets, primal)


def weights(cache: RidgeCache, l2_reg: float) -> np.ndarray:
    """Ridge weights (D+1 × C) for one L2 strength."""
    inv = 1.0 / (cache.eigvals + l2_reg)
    q = cache.eigvecs
    if cache.primal:  # (XᵀX + λI)⁻¹ Xᵀ Y
        return q @ (inv[:, None] * (q.T @ (cache.x.T @ cache.y)))
    # Xᵀ (XXᵀ + λI)⁻¹ Y
    return cache.x.T @ (q @ (inv[:, None] * (q.T @ cache.y)))


def scores(cache: RidgeCache, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _whiten(x, cache.mean, cache.std) @ w


@dataclass
class ProbeResult:
    accuracy: float
    mean_per_class_accuracy: float
    validation_accuracy: float
    l2_reg: float
    predictions: np.ndarray
    scores: np.ndarray


def mean_per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    accs = [float(np.mean(pred[y == c] == c)) for c in range(num_classes) if np.any(y == c)]
    return float(np.mean(accs)) if accs else float("nan")


def ridge_few_shot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    l2_grid: tuple[float, ...] = L2_GRID,
) -> ProbeResult:
    """Fit the probe on the shots, pick L2 on validation (ties: the stronger), score the test."""
    cache = precompute(x_train, y_train, num_classes)
    best = None
    for l2 in sorted(l2_grid, reverse=True):
        w = weights(cache, l2)
        val_acc = float(np.mean(scores(cache, w, x_val).argmax(1) == y_val))
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, w)
    val_acc, l2, w = best
    s = scores(cache, w, x_test)
    pred = s.argmax(1)
    return ProbeResult(
        accuracy=float(np.mean(pred == y_test)),
        mean_per_class_accuracy=mean_per_class_accuracy(pred, np.asarray(y_test), num_classes),
        validation_accuracy=val_acc,
        l2_reg=l2,
        predictions=pred,
        scores=s,
    )
