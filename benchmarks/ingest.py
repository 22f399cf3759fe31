"""Images/s delivered as model-ready batches: transferlab's Ray Data path vs a plain torch
DataLoader over the same shards with the same decode, vs single-process decode.

    python benchmarks/ingest.py --images 3000 --size 256 --image-size 224 --cpus 2 [--webdataset]

Writes synthetic JPEGs (smooth random colour fields, so they compress like photos) into
transferlab Parquet shards in a temporary directory, then times each path over ``--epochs``
passes and reports the last one (the first includes start-up). ``--webdataset`` also times the
Ray Data path over the same samples as transferlab WebDataset tars (the read-unit path that raw
sources take too). Run by hand; figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from datasets_ import write_sharded_dataset
from datasets_.pipeline import decode_images, normalize, ray_dataset


def synthetic_dataset(root: str, n: int, size: int, shard_size: int, shard_format: str = "parquet"):
    rng = np.random.default_rng(0)

    def rows():
        for i in range(n):
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield "train", {"key": f"img-{i:07d}", "image": buf.getvalue(), "label": i % 10, "caption": ""}

    return write_sharded_dataset(os.path.join(root, f"ds-{shard_format}"), "synthetic", [str(c) for c in range(10)], rows(),
                                 shard_size, shard_format=shard_format)


def raw_decode(ds, image_size: int, batch: int) -> float:
    blobs = [b for f in ds.files("train") for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        decode_images(blobs[i : i + batch], image_size)
    return len(blobs) / (time.perf_counter() - t0)


class _Shards(torch.utils.data.IterableDataset):
    def __init__(self, files, image_size, batch):
        self.files, self.image_size, self.batch = files, image_size, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        files = self.files if info is None else self.files[info.id :: info.num_workers]
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=self.batch, columns=["image", "label"]):
                yield torch.from_numpy(decode_images(rb.column("image").to_pylist(), self.image_size)), torch.from_numpy(
                    rb.column("label").to_numpy()
                )


def dataloader(ds, image_size: int, batch: int, workers: int, epochs: int) -> float:
    loader = torch.utils.data.DataLoader(_Shards(ds.files("train"), image_size, batch), batch_size=None, num_workers=workers)
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        rate = n / (time.perf_counter() - t0)
    return rate


def ray_data(ds, image_size: int, batch: int, epochs: int) -> float:
    data = ray_dataset(ds, "train", image_size, decode_batch_size=batch)
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in data.iter_torch_batches(batch_size=batch, prefetch_batches=4):
            n += len(normalize(b["image"]))  # model-ready float32, as the DataLoader yields
        rate = n / (time.perf_counter() - t0)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=256, help="stored JPEG side")
    p.add_argument("--image-size", type=int, default=224, help="decoded side fed to the model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--webdataset", action="store_true", help="also time the Ray Data path over WebDataset tars")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} JPEGs of {args.size}px ...", flush=True)
        ds = synthetic_dataset(tmp, args.images, args.size, shard_size=max(1, args.images // (2 * args.cpus)))
        results = {"raw decode, 1 process": raw_decode(ds, args.image_size, args.batch)}
        results[f"torch DataLoader, {args.cpus} workers"] = dataloader(ds, args.image_size, args.batch, args.cpus, args.epochs)
        import ray

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        results[f"transferlab Ray Data path, {args.cpus} CPUs"] = ray_data(ds, args.image_size, args.batch, args.epochs)
        if args.webdataset:
            tars = synthetic_dataset(tmp, args.images, args.size, max(1, args.images // (2 * args.cpus)), "webdataset")
            results[f"same, WebDataset tars, {args.cpus} CPUs"] = ray_data(tars, args.image_size, args.batch, args.epochs)
        ray.shutdown()
    base = results[f"torch DataLoader, {args.cpus} workers"]
    print(f"\n{args.images} JPEG {args.size}px -> float32 3x{args.image_size}x{args.image_size}, batch {args.batch}, last of {args.epochs} passes")
    for name, rate in results.items():
        print(f"{name:<40} {rate:8.0f} img/s  {rate / base:5.2f}x DataLoader")


if __name__ == "__main__":
    main()
