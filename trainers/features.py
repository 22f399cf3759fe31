"""Frozen features and their content-addressed cache.

A feature set is addressed by what determines it: the SHA-256 of the model's weights, the task's
fingerprint, the split, the layer, the image size and the extractor's version. Equal addresses
mean equal features, so the cache is shared by every shots × seed × protocol of a study and by
every later study on the same storage (``<storage_path>/feature_cache``, local or an object
store). Entries are ``.npz`` files without pickled objects, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from datasets_.objstore import filesystem, write_atomic

EXTRACTOR_VERSION = 1


@dataclass
class Features:
    keys: np.ndarray
    x: np.ndarray
    y: np.ndarray


def feature_key(weights_digest: str, task_fingerprint: str, split: str, layer: str, image_size: int) -> str:
    payload = json.dumps([EXTRACTOR_VERSION, weights_digest, task_fingerprint, split, layer, int(image_size)])
    return hashlib.sha256(payload.encode()).hexdigest()


class FeatureCache:
    """Feature sets under ``root`` (a directory or an object-store URI such as ``s3://b/p``)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = filesystem(self.root)

    def _file(self, key: str) -> str:
        return f"{self.path}/{key[:2]}/{key}.npz"

    def get(self, key: str) -> Features | None:
        import pyarrow.fs

        path = self._file(key)
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            return Features(data["keys"], data["x"].astype(np.float64), data["y"])

    def put(self, key: str, features: Features) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(features.keys, dtype=str), x=features.x.astype(np.float32), y=features.y)
        write_atomic(f"{self.root}/{key[:2]}/{key}.npz", lambda f: f.write(buf.getvalue()))
