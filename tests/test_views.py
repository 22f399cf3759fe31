"""Data views are pure functions of key, seed and parameters."""

import numpy as np
import pytest

from datasets_ import few_shot_indices, in_subset, noisy_labels, subset_threshold, validation_mask
from datasets_.views import PretrainView, influence_holdout

KEYS = np.array([f"sample-{i:05d}" for i in range(20000)], dtype=object)
LABELS = np.arange(20000) % 10


def test_label_noise_is_deterministic_per_key_and_independent_of_order():
    a = noisy_labels(KEYS, LABELS, 10, 0.4, seed=3)
    perm = np.random.default_rng(0).permutation(len(KEYS))
    b = noisy_labels(KEYS[perm], LABELS[perm], 10, 0.4, seed=3)
    assert np.array_equal(a[perm], b)
    assert not np.array_equal(a, noisy_labels(KEYS, LABELS, 10, 0.4, seed=4))


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.8, 1.0])
def test_label_noise_rate_and_targets(rate):
    noisy = noisy_labels(KEYS, LABELS, 10, rate, seed=0)
    flipped = noisy != LABELS
    assert abs(flipped.mean() - rate) < 0.015
    assert noisy.min() >= 0 and noisy.max() <= 9
    # Flipped labels spread over the other classes, roughly uniformly.
    moved = (noisy[flipped] - LABELS[flipped]) % 10
    if rate > 0:
        counts = np.bincount(moved, minlength=10)
        assert counts[0] == 0
        assert counts[1:].min() > 0.8 * counts[1:].mean()


def test_noise_rate_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        noisy_labels(KEYS, LABELS, 10, 1.5, seed=0)


def test_subsets_have_exact_size_and_are_nested():
    masks = {}
    for n in (500, 2000, 8000):
        t = subset_threshold(KEYS, n, seed=7)
        masks[n] = in_subset(KEYS, t, seed=7)
        assert masks[n].sum() == n
    assert np.all(masks[2000][masks[500]])
    assert np.all(masks[8000][masks[2000]])
    other = in_subset(KEYS, subset_threshold(KEYS, 500, seed=8), seed=8)
    assert (other & masks[500]).sum() < 100  # another seed draws a different subset


def test_subset_membership_does_not_depend_on_batching():
    t = subset_threshold(KEYS, 1234, seed=1)
    whole = in_subset(KEYS, t, seed=1)
    pieces = np.concatenate([in_subset(KEYS[i : i + 777], t, seed=1) for i in range(0, len(KEYS), 777)])
    assert np.array_equal(whole, pieces)


def test_subset_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        subset_threshold(KEYS[:10], 11, seed=0)


def test_pretrain_view_fingerprint_identifies_the_sample_set():
    a = PretrainView("fp", 500, 0.4, 0, 10, threshold=0.1)
    assert a.fingerprint == PretrainView("fp", 500, 0.4, 0, 10, threshold=0.1).fingerprint
    assert a.fingerprint != PretrainView("fp", 500, 0.2, 0, 10).fingerprint
    assert a.fingerprint != PretrainView("other", 500, 0.4, 0, 10).fingerprint


def test_few_shot_sampling_k_per_class_seeded_and_nested():
    keys, labels = KEYS[:1000], LABELS[:1000]
    five = few_shot_indices(keys, labels, 5, seed=0)
    assert np.array_equal(np.bincount(labels[five], minlength=10), np.full(10, 5))
    assert np.array_equal(five, few_shot_indices(keys, labels, 5, seed=0))
    assert not np.array_equal(five, few_shot_indices(keys, labels, 5, seed=1))
    ten = few_shot_indices(keys, labels, 10, seed=0)
    assert set(five) <= set(ten)


def test_few_shot_class_too_small_names_the_class():
    labels = np.array([0] * 10 + [1] * 3)
    keys = np.array([f"k{i}" for i in range(13)], dtype=object)
    with pytest.raises(ValueError, match="class 1 has 3 examples, fewer than shots=5"):
        few_shot_indices(keys, labels, 5, seed=0)


def test_validation_carve_out_is_disjoint_from_the_shot_pool():
    val = validation_mask(KEYS[:2000], 0.2)
    assert 0.17 < val.mean() < 0.23
    pool = np.flatnonzero(~val)
    picked = pool[few_shot_indices(KEYS[pool], LABELS[pool], 10, seed=0)]
    assert not val[picked].any()


def test_influence_holdout_is_a_stable_share_independent_of_the_validation_carve_out():
    held = influence_holdout(KEYS[:5000], 0.2)
    assert 0.18 < held.mean() < 0.22
    assert (influence_holdout(KEYS[:5000][::-1], 0.2) == held[::-1]).all()  # by key, not by position
    val = validation_mask(KEYS[:5000], 0.2)
    assert abs((held & val).mean() - 0.04) < 0.01  # independent salts: 0.2 · 0.2 overlap before removal
    with pytest.raises(ValueError, match="must be in"):
        influence_holdout(KEYS[:10], 1.0)


def test_pairwise_noise_moves_to_the_next_class():
    noisy = noisy_labels(KEYS, LABELS, 10, 0.3, seed=0, pattern="pairwise")
    flipped = noisy != LABELS
    assert abs(flipped.mean() - 0.3) < 0.015
    assert np.all(noisy[flipped] == (LABELS[flipped] + 1) % 10)
    # The same samples flip as under symmetric noise: only the target differs.
    assert np.array_equal(flipped, noisy_labels(KEYS, LABELS, 10, 0.3, seed=0) != LABELS)


def test_transition_matrix_noise_follows_the_matrix():
    t = np.eye(3) * 0.6
    t[0, 1] = t[1, 2] = t[2, 0] = 0.4
    labels = np.arange(len(KEYS)) % 3
    noisy = noisy_labels(KEYS, labels, 3, 0.0, seed=0, transition=t)
    for c in range(3):
        observed = np.bincount(noisy[labels == c], minlength=3) / (labels == c).sum()
        np.testing.assert_allclose(observed, t[c], atol=0.02)
    with pytest.raises(ValueError, match="row-stochastic|summing to 1"):
        noisy_labels(KEYS, labels, 3, 0.0, seed=0, transition=np.ones((3, 3)))


def test_class_subsets_are_seeded_and_sized():
    from datasets_.views import class_subset

    a = class_subset(20, 0.5, seed=0)
    assert len(a) == 10 and np.all(np.diff(a) > 0) and a.max() < 20
    assert np.array_equal(a, class_subset(20, 0.5, seed=0))
    draws = {tuple(class_subset(20, 0.5, seed=s)) for s in range(30)}
    assert len(draws) == 30
    # Over many seeds every class is in about half the subsets (the datamodel design).
    counts = np.bincount(np.concatenate([class_subset(20, 0.5, seed=s) for s in range(400)]), minlength=20)
    assert counts.min() > 150 and counts.max() < 250
    assert len(class_subset(20, 1.0, seed=3)) == 20 and len(class_subset(3, 0.01, seed=0)) == 1


def test_pretrain_view_filters_classes_before_noise():
    view = PretrainView("fp", None, 0.0, 0, 10, threshold=1.0, keep_classes=(1, 3))
    keep, labels = view.apply(KEYS[:100], LABELS[:100])
    assert set(LABELS[:100][keep]) == {1, 3}
    assert np.array_equal(labels, LABELS[:100])


def test_balanced_subsets_are_even_and_nested():
    from datasets_.views import balanced_thresholds

    labels = np.where(np.arange(len(KEYS)) % 4 == 0, 0, LABELS)  # class 0 over-represented
    prev = None
    for size in (100, 1000):
        t = balanced_thresholds(KEYS, labels, size, seed=0, classes=range(10), num_classes=10)
        mask = in_subset(KEYS, t, seed=0, labels=labels)
        assert np.array_equal(np.bincount(labels[mask], minlength=10), np.full(10, size // 10))
        if prev is not None:
            assert np.all(mask[prev])
        prev = mask
    only = balanced_thresholds(KEYS, labels, 7, seed=0, classes=[2, 5], num_classes=10)
    mask = in_subset(KEYS, only, seed=0, labels=labels)
    assert sorted(np.bincount(labels[mask], minlength=10)[[2, 5]]) == [3, 4] and mask.sum() == 7


def test_caption_curation():
    from datasets_.views import curation_mask

    caps = ["a photo of a dog", "a drawing of a cat", "", "photo: cat"]
    assert curation_mask(caps, matches="photo").tolist() == [True, False, False, True]
    assert curation_mask(caps, matches="photo", excludes="cat").tolist() == [True, False, False, False]
    assert curation_mask(caps).all()


def test_plan_applies_source_curation_and_balance(tmp_path):
    """The planned view, applied to every training sample, selects exactly what it promises."""
    from datasets_ import prepare_builtin
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import parse_spec

    spec = parse_spec(
        {
            "study": "v",
            "sources": {"low": {"uri": "builtin:digits", "keep_classes": [0, 1, 2, 3], "drop_classes": ["3"]}},
            "tasks": {"d": "builtin:digits"},
            "pretrain": {
                "class_balanced": True,
                "noise_pattern": "pairwise",
                "sweep": {"pretrain_size": [60, 150], "label_noise": [0.5]},
            },
            "transfer": {"shots": [1]},
        }
    )
    plan = build_plan(spec)
    ds = prepare_builtin("digits")
    split = ds.keys_and_labels("train")
    masks = []
    for job in plan.pretrain_runs:
        assert job.view.keep_classes == (0, 1, 2)
        keep, noisy = job.view.apply(split.keys, split.labels)
        assert keep.sum() == job.num_train_samples == job.view.pretrain_size
        assert np.array_equal(np.bincount(split.labels[keep], minlength=3)[:3], np.full(3, job.view.pretrain_size // 3))
        flipped = noisy[keep] != split.labels[keep]
        assert np.all(noisy[keep][flipped] == (split.labels[keep][flipped] + 1) % 10)
        assert abs(flipped.mean() - job.realized_label_noise) < 1e-12
        masks.append(keep)
    assert np.all(masks[1][masks[0]])


def test_caption_noise_swaps_a_fraction_and_keeps_the_multiset():
    from datasets_.views import swapped_captions

    caps = [f"caption {i}" for i in range(len(KEYS))]
    noisy = swapped_captions(KEYS, caps, 0.3, seed=0)
    changed = np.array([a != b for a, b in zip(caps, noisy)])
    assert abs(changed.mean() - 0.3) < 0.015
    assert sorted(noisy) == sorted(caps)
    assert noisy == swapped_captions(KEYS, caps, 0.3, seed=0)
    assert swapped_captions(KEYS, caps, 0.0, seed=0) == caps
