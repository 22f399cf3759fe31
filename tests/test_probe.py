"""The closed-form ridge probe against a direct solve, and its L2 selection."""

import numpy as np
import pytest

from trainers.probe import BIAS_CONSTANT, precompute, ridge_few_shot, scores, weights


def _reference_weights(x, y, num_classes, l2):
    """Textbook ridge on whitened, bias-padded features: solve (XᵀX + λI) W = XᵀY."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    xa = np.hstack([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)])
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    return np.linalg.solve(xa.T @ xa + l2 * np.eye(xa.shape[1]), xa.T @ t)


@pytest.mark.parametrize("n,d", [(200, 16), (10, 64)], ids=["primal-n>d", "dual-n<d"])
@pytest.mark.parametrize("l2", [1e-2, 1.0, 1e3])
def test_matches_direct_solve(n, d, l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = np.arange(n) % 5
    cache = precompute(x, y, 5)
    assert cache.primal == (n >= d + 1)
    np.testing.assert_allclose(weights(cache, l2), _reference_weights(x, y, 5, l2), rtol=1e-6, atol=1e-8)


def test_separable_classes_are_learned_from_one_shot():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=5, size=(4, 8))

    def sample(k):
        y = np.repeat(np.arange(4), k)
        return centers[y] + rng.normal(scale=0.3, size=(len(y), 8)), y

    (xt, yt), (xv, yv), (xs, ys) = sample(1), sample(20), sample(50)
    r = ridge_few_shot(xt, yt, xv, yv, xs, ys, num_classes=4)
    assert r.accuracy == 1.0 and r.validation_accuracy == 1.0
    assert r.mean_per_class_accuracy == 1.0
    assert r.predictions.shape == (200,) and r.scores.shape == (200, 4)


def test_l2_is_chosen_on_validation_not_test():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 30))
    y = rng.integers(0, 3, size=60)
    xv, yv = rng.normal(size=(40, 30)), rng.integers(0, 3, size=40)
    grid = (1e-3, 1.0, 1e3)
    r = ridge_few_shot(x, y, xv, yv, xv, yv, 3, l2_grid=grid)
    cache = precompute(x, y, 3)
    val_accs = {l2: np.mean(scores(cache, weights(cache, l2), xv).argmax(1) == yv) for l2 in grid}
    assert r.validation_accuracy == max(val_accs.values())
    assert val_accs[r.l2_reg] == r.validation_accuracy
