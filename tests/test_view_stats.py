"""Planning's view statistics, computed part by part (in this process or by Ray actors), equal
what the whole split gives in one array: the same exact thresholds, counts and noise rates."""

import numpy as np
import pytest

from datasets_ import PretrainView, write_sharded_dataset
from datasets_.view_stats import ViewError, split_parts, view_statistics
from datasets_.views import balanced_thresholds, curation_mask, in_subset, noisy_labels, subset_threshold

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.integers(0, NUM_CLASSES, n)
    words = np.array(["cat", "dog", "bird", ""])[rng.integers(0, 4, n)]
    rows = (
        ("train", {"key": f"s{i:05d}", "image": b"x", "label": int(labels[i]), "caption": str(words[i])})
        for i in range(n)
    )
    ds = write_sharded_dataset(
        tmp_path_factory.mktemp("vs") / "ds", "toy", [f"c{i}" for i in range(NUM_CLASSES)], rows, shard_size=400
    )
    keys = np.array([f"s{i:05d}" for i in range(n)], dtype=object)
    return ds, keys, labels, [str(w) for w in words]


def _direct(view: PretrainView, keys, labels, captions):
    """The view's statistics from the whole split at once (what planning computed before)."""
    allowed = np.ones(len(keys), bool)
    if view.keep_classes is not None:
        allowed &= np.isin(labels, view.keep_classes)
    if view.needs_captions:
        allowed &= curation_mask(captions, view.caption_matches, view.caption_excludes)
    if view.class_balanced:
        classes = np.unique(labels[allowed])
        threshold = balanced_thresholds(
            keys[allowed], labels[allowed], view.pretrain_size, view.seed, classes, NUM_CLASSES
        )
    else:
        threshold = subset_threshold(keys[allowed], view.pretrain_size, view.seed)
    keep = in_subset(keys, threshold, view.seed, labels) & allowed
    noisy = noisy_labels(keys[keep], labels[keep], NUM_CLASSES, view.label_noise, view.seed, view.noise_pattern)
    return threshold, int(keep.sum()), float((noisy != labels[keep]).mean())


VIEWS = [
    PretrainView("fp", 500, 0.0, 0, NUM_CLASSES),
    PretrainView("fp", 1234, 0.3, 1, NUM_CLASSES),
    PretrainView("fp", None, 0.2, 2, NUM_CLASSES, noise_pattern="pairwise"),
    PretrainView("fp", 300, 0.4, 0, NUM_CLASSES, keep_classes=(0, 2, 5)),
    PretrainView("fp", 140, 0.1, 3, NUM_CLASSES, class_balanced=True),
    PretrainView("fp", 200, 0.0, 4, NUM_CLASSES, caption_matches="cat|dog", class_balanced=True),
    PretrainView("fp", 100, 0.25, 5, NUM_CLASSES, caption_excludes="bird"),
]


@pytest.mark.parametrize("where", ["here", "processes", "ray"])
def test_part_by_part_statistics_equal_the_whole_split(dataset, where, request):
    ds, keys, labels, captions = dataset
    assert len(split_parts(ds, "train")) == 8
    if where == "ray":
        request.getfixturevalue("ray_cluster")
    stats = view_statistics(ds, VIEWS, use_cache=False, where=where)
    for view, st in zip(VIEWS, stats):
        threshold, selected, realized = _direct(view, keys, labels, captions)
        assert st.threshold == threshold  # exact: the same float, not an approximation
        assert st.selected == selected == (view.pretrain_size or st.selected)
        assert st.realized_noise == pytest.approx(realized, abs=1e-12)
        assert st.captioned == sum(c != "" for c in captions)  # some views read captions: all count them


def test_views_that_cannot_be_drawn_say_why_and_how_many_remain(dataset):
    ds, keys, labels, _ = dataset
    smallest = int(np.bincount(labels, minlength=NUM_CLASSES).min())
    too_big, no_class, lopsided = view_statistics(
        ds,
        [
            PretrainView("fp", 3001, 0.0, 0, NUM_CLASSES),
            PretrainView("fp", 10, 0.0, 0, NUM_CLASSES, caption_matches="^zebra$"),
            PretrainView("fp", NUM_CLASSES * (smallest + 1), 0.0, 0, NUM_CLASSES, class_balanced=True),
        ],
        use_cache=False,
    )
    assert isinstance(too_big, ViewError) and "3001 exceeds the 3000 available" in str(too_big)
    assert isinstance(no_class, ViewError) and no_class.eligible == 0
    assert isinstance(lopsided, ViewError) and f"has {smallest} samples, fewer than the {smallest + 1}" in str(lopsided)


def test_statistics_are_cached_per_dataset_and_view(dataset, tmp_path, monkeypatch):
    ds, *_ = dataset
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path))
    first = view_statistics(ds, VIEWS[:2])
    assert len(list((tmp_path / "view-stats").iterdir())) == 2
    assert view_statistics(ds, VIEWS[:2]) == first
