"""Data interventions as pure functions of (sample key, seed, parameters).

Nothing here depends on iteration order, worker count or Ray: the same key, seed and
parameters always give the same decision, so a view is reproducible from its description alone.

- :func:`subset_threshold` / :func:`in_subset`: nested size subsets. A sample is in the size-n
  subset iff its hash is among the n smallest, so for one seed the 500-sample subset lies inside
  the 2000-sample one.
- :func:`noisy_labels`: symmetric label noise. Whether a sample's label flips, and to which other
  class, depends only on its key, so noise is identical across sizes and workers.
- :func:`few_shot_indices`: k examples per class, nested in k for one seed.
- :func:`validation_mask`: a fixed validation carve-out of a training split.
- :func:`influence_holdout`: the examples of a task's training split a datamodel sweep measures
  influence on, which no probe trains or selects on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def unit_hash(keys: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """Map each key to a float in [0, 1), uniform and independent across (seed, salt)."""
    prefix = f"{seed}\x1f{salt}\x1f".encode()
    out = np.empty(len(keys), dtype=np.float64)
    for i, k in enumerate(keys):
        digest = hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def subset_threshold(keys: Sequence[str], size: int | None, seed: int) -> float:
    """The hash threshold whose subset ``unit_hash(key) <= threshold`` has exactly ``size`` keys.

    ``size=None`` selects everything. Raises ValueError when ``size`` exceeds the key count.
    """
    if size is None:
        return 1.0
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    if size > len(keys):
        raise ValueError(f"subset size {size} exceeds the {len(keys)} available samples")
    u = unit_hash(keys, seed, "subset")
    return float(np.partition(u, size - 1)[size - 1])


def in_subset(keys: Sequence[str], threshold, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Membership in a size subset: ``threshold`` is one float, or one per class (``labels``
    then picks each sample's) for class-balanced subsets."""
    if isinstance(threshold, (tuple, list, np.ndarray)):
        per_sample = np.asarray(threshold, dtype=np.float64)[np.asarray(labels, dtype=np.int64)]
        return unit_hash(keys, seed, "subset") <= per_sample
    if threshold >= 1.0:
        return np.ones(len(keys), dtype=bool)
    return unit_hash(keys, seed, "subset") <= threshold


def balanced_thresholds(
    keys: Sequence[str], labels: np.ndarray, size: int, seed: int, classes: Sequence[int], num_classes: int
) -> tuple[float, ...]:
    """Per-class thresholds selecting ``size`` samples spread evenly over ``classes`` (the first
    ``size % len(classes)`` classes get one more); classes not listed get none. Nested in size."""
    labels = np.asarray(labels)
    classes = list(classes)
    base, extra = divmod(size, len(classes))
    out = [-1.0] * num_classes
    u = unit_hash(keys, seed, "subset")
    for i, c in enumerate(classes):
        want = base + (1 if i < extra else 0)
        have = u[labels == c]
        if want > len(have):
            raise ValueError(
                f"class {c} has {len(have)} samples, fewer than the {want} a balanced subset of {size} needs"
            )
        if want:
            out[c] = float(np.partition(have, want - 1)[want - 1])
    return tuple(out)


def curation_mask(captions: Sequence[str], matches: str | None = None, excludes: str | None = None) -> np.ndarray:
    """Samples whose caption matches the ``matches`` regex and not the ``excludes`` one."""
    import re

    keep = np.ones(len(captions), dtype=bool)
    if matches:
        pattern = re.compile(matches)
        keep &= np.array([bool(pattern.search(c or "")) for c in captions], dtype=bool)
    if excludes:
        pattern = re.compile(excludes)
        keep &= np.array([not pattern.search(c or "") for c in captions], dtype=bool)
    return keep


NOISE_PATTERNS = ("symmetric", "pairwise")


def noisy_labels(
    keys: Sequence[str],
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    seed: int,
    pattern: str = "symmetric",
    transition: np.ndarray | None = None,
) -> np.ndarray:
    """Label noise decided per sample key. Returns a new array.

    - ``symmetric``: with probability ``rate`` a label moves to a uniformly chosen *other* class.
    - ``pairwise``: with probability ``rate`` class c becomes class c+1 (mod C), the
      "flip to the next class" pattern.
    - ``transition``: a C×C row-stochastic matrix T; a label c becomes c' with probability
      T[c, c'] (``rate`` and ``pattern`` are then ignored).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if transition is not None:
        t = np.asarray(transition, dtype=np.float64)
        if t.shape != (num_classes, num_classes) or (t < 0).any() or not np.allclose(t.sum(1), 1.0):
            raise ValueError(
                f"transition must be a {num_classes}x{num_classes} matrix of non-negative rows summing to 1"
            )
        u = unit_hash(keys, seed, "noise-transition")
        cdf = np.cumsum(t, axis=1)[labels]
        return np.minimum((u[:, None] >= cdf).sum(1), num_classes - 1).astype(np.int64)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    if pattern not in NOISE_PATTERNS:
        raise ValueError(f"unknown noise pattern '{pattern}' (known: {', '.join(NOISE_PATTERNS)})")
    if rate == 0.0 or num_classes < 2:
        return labels.copy()
    flip = unit_hash(keys, seed, "noise-flip") < rate
    if pattern == "pairwise":
        offset = np.ones(len(labels), dtype=np.int64)
    else:
        offset = 1 + np.floor(unit_hash(keys, seed, "noise-target") * (num_classes - 1)).astype(np.int64)
    return np.where(flip, (labels + offset) % num_classes, labels)


def swapped_captions(keys: Sequence[str], captions: Sequence[str], rate: float, seed: int) -> list[str]:
    """Caption noise for image-text sources: a ``rate`` fraction of samples (chosen by key hash)
    get the caption of another sample from that same fraction (a cyclic shift in hash order, so
    no chosen sample keeps its own). The multiset of captions is unchanged."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption noise rate must be in [0, 1], got {rate}")
    out = list(captions)
    chosen = np.flatnonzero(unit_hash(keys, seed, "caption-swap") < rate)
    if len(chosen) < 2:
        return out
    order = chosen[np.argsort(unit_hash([keys[i] for i in chosen], seed, "caption-order"), kind="stable")]
    for src, dst in zip(order, np.roll(order, 1)):
        out[dst] = captions[src]
    return out


def class_subset(num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted ids of a random ``fraction`` of the classes (at least one): the random
    α-subsets of Jain et al.'s datamodels, reproducible from (num_classes, fraction, seed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"class fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * num_classes)))
    order = np.argsort(unit_hash([str(c) for c in range(num_classes)], seed, "class-subset"), kind="stable")
    return np.sort(order[:k])


def validation_mask(keys: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True for the keys carved out as validation (about ``fraction`` of them)."""
    return unit_hash(keys, seed, "validation") < fraction


def influence_holdout(keys: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True for the keys of a task's training split held out to measure influence on (about
    ``fraction`` of them). Independent of :func:`validation_mask` (another salt): the caller removes
    the holdout first, and the probe's validation and shots come from the rest, so the examples
    influence is measured on are seen by no probe, and the task's test split stays unseen."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"influence holdout fraction must be in (0, 1), got {fraction}")
    return unit_hash(keys, seed, "influence") < fraction


def few_shot_indices(
    keys: Sequence[str], labels: np.ndarray, shots: int, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of ``shots`` examples per class, chosen by key hash (nested in ``shots``).

    Raises ValueError naming the class if one has fewer than ``shots`` examples.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    order = unit_hash(keys, seed, "shots")
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than shots={shots}")
        picked.append(idx[np.argsort(order[idx], kind="stable")[:shots]])
    return np.sort(np.concatenate(picked))


@dataclass(frozen=True)
class PretrainView:
    """A reproducible view of a source's training split: a nested size subset with label noise.

    ``threshold`` is derived from the keys (:func:`subset_threshold`) and makes the subset
    decidable per sample while streaming.
    """

    source_fingerprint: str
    pretrain_size: int | None
    label_noise: float
    seed: int
    num_classes: int
    threshold: float | tuple[float, ...] = 1.0  # one per class for class-balanced subsets
    noise_pattern: str = "symmetric"
    keep_classes: tuple[int, ...] | None = None  # None = every class
    caption_matches: str | None = None  # curation: keep captions matching this regex
    caption_excludes: str | None = None  # curation: drop captions matching this regex
    class_balanced: bool = False
    caption_noise: float = 0.0  # image-text training: share of captions swapped (swapped_captions)

    @property
    def needs_captions(self) -> bool:
        return bool(self.caption_matches or self.caption_excludes)

    @property
    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("threshold")
        if not d["caption_noise"]:
            d.pop("caption_noise")  # views without it keep the fingerprints they had before it existed
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def eligible(self, labels: np.ndarray, captions: Sequence[str] | None = None) -> np.ndarray:
        """Samples that pass the class and caption filters (before the size subset)."""
        keep = np.ones(len(labels), dtype=bool)
        if self.keep_classes is not None:
            keep &= np.isin(np.asarray(labels), self.keep_classes)
        if self.needs_captions:
            keep &= curation_mask(captions, self.caption_matches, self.caption_excludes)
        return keep

    def apply(
        self, keys: Sequence[str], labels: np.ndarray, captions: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (keep mask, training labels) for a batch of samples.

        Class and caption filters come first, then the size subset is drawn among the remaining
        samples (``threshold`` is computed over them), then labels are corrupted.
        """
        keep = self.eligible(labels, captions) & in_subset(keys, self.threshold, self.seed, labels)
        return keep, noisy_labels(keys, labels, self.num_classes, self.label_noise, self.seed, self.noise_pattern)
