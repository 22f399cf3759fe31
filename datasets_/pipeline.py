"""From shards to model-ready batches: image decoding, and the Ray Data streams that feed
training workers.

Batches are dicts ``{"image": float32 [B, 3, S, S], "label": int64 [B]}``: every image becomes
3-channel at ``image_size`` so models transfer across grayscale and colour data.
"""

from __future__ import annotations

import functools
import io
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from datasets_.shards import ShardedDataset
from datasets_.views import PretrainView

# Normalization to roughly [-1, 1]; one constant for every dataset keeps features comparable.
MEAN, STD = 0.5, 0.5


def decode_images(blobs, image_size: int) -> np.ndarray:
    """Decode encoded images (PNG/JPEG/WebP bytes) into a normalized float32 NCHW array."""
    out = np.empty((len(blobs), 3, image_size, image_size), dtype=np.float32)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    out *= 1.0 / (255.0 * STD)
    out -= MEAN / STD
    return out


def _view_and_decode(batch: dict, view: PretrainView | None, image_size: int) -> dict:
    labels = np.asarray(batch["label"], dtype=np.int64)
    images = batch["image"]
    if view is not None:
        keep, labels = view.apply(batch["key"], labels)
        labels = labels[keep]
        images = [b for b, k in zip(images, keep) if k]
    return {"image": decode_images(images, image_size), "label": labels}


def ray_dataset(
    dataset: ShardedDataset,
    split: str,
    image_size: int,
    view: PretrainView | None = None,
    decode_batch_size: int = 256,
    task_cpus: float = 0.25,
):
    """A lazily streamed Ray Dataset of decoded batches of one split, with an optional view.

    Nothing is materialized: shards are read, filtered to the view, relabelled and decoded in
    Ray Data tasks while training consumes them. ``task_cpus`` is the CPU reservation of each
    read/decode task: fractional, so that training workers holding whole CPUs never leave ingest
    with too little to schedule a task (which hangs silently).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Ray 2.60's default Parquet datasource (V2) plans a file-listing task that needs a whole
    # CPU and cannot be given less: beside training workers that hold all but a fraction of a
    # CPU it never schedules and ingest hangs. V1 reads one task per file at ``task_cpus``.
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(dataset.files(split), columns=["key", "image", "label"], num_cpus=task_cpus)
    finally:
        ctx.use_datasource_v2 = previous
    return ds.map_batches(
        functools.partial(_view_and_decode, view=view, image_size=image_size),
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=task_cpus,
    )


def iter_local_batches(
    dataset: ShardedDataset, split: str, image_size: int, batch_size: int = 256
) -> Iterator[dict]:
    """Decode a split in this process, in file order, with keys (for small downstream tasks)."""
    for path in dataset.files(split):
        pf = pq.ParquetFile(path)
        for rb in pf.iter_batches(batch_size=batch_size, columns=["key", "image", "label"]):
            yield {
                "key": np.asarray(rb.column("key").to_pylist(), dtype=object),
                "image": decode_images(rb.column("image").to_pylist(), image_size),
                "label": rb.column("label").to_numpy().astype(np.int64),
            }
