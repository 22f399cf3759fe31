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


# ---------------------------------------------------------------------------------------------
# Logistic regression probe.

LOGISTIC_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LogisticResult:
    validation_accuracy: float
    l2_reg: float
    weights: np.ndarray  # (D, C) on standardized features
    bias: np.ndarray  # (C,)
    mean: np.ndarray
    std: np.ndarray
    scores: np.ndarray | None  # test logits, when test features were given

    def raw_head(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, D], b [C]) acting on raw, unstandardized features: the probe folded into a
        linear layer (for LP-FT)."""
        w = self.weights / self.std.reshape(-1, 1)
        b = self.bias - (self.mean.reshape(1, -1) @ w).ravel()
        return w.T.copy(), b


def logistic_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray | None,
    num_classes: int,
    l2_grid: tuple[float, ...] = LOGISTIC_L2_GRID,
    max_iter: int = 200,
) -> LogisticResult:
    """Multinomial logistic regression on standardized features, fitted by full-batch L-BFGS.

    The loss is the mean cross-entropy plus ``l2 / 2 * ||W||²`` (the bias is not penalized).
    Every L2 strength of the grid is fitted (strongest first, each warm-starting the next); the
    one with the best validation accuracy wins (ties: the stronger). The test set is only scored.
    """
    import torch

    x = np.asarray(x_train, dtype=np.float64)
    mean = x.mean(0)
    std = x.std(0) + 1e-5
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    xv = torch.from_numpy((np.asarray(x_val, dtype=np.float64) - mean) / std)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    best = None
    for l2 in sorted(l2_grid, reverse=True):
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

        def closure(opt=opt, l2=l2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val_acc = float(((xv @ w + b).argmax(1).numpy() == np.asarray(y_val)).mean()) if len(y_val) else 0.0
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, w.detach().clone().numpy(), b.detach().clone().numpy())
    val_acc, l2, wb, bb = best
    scores = None
    if x_test is not None:
        scores = ((np.asarray(x_test, dtype=np.float64) - mean) / std) @ wb + bb
    return LogisticResult(val_acc, l2, wb, bb, mean, std, scores)
