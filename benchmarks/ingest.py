"""Images/s delivered as model-ready batches: transferlab's Ray Data path vs a plain torch
DataLoader over the same shards with the same decode, vs single-process decode.

    python benchmarks/ingest.py --images 8000 --size 256 --image-size 224 --cpus 2 --rounds 3 [--webdataset]

Writes synthetic JPEGs (smooth random colour fields, so they compress like photos) into
transferlab Parquet shards in a temporary directory, then times each path over ``--epochs``
passes and keeps the last one (the first includes start-up). The paths take turns for
``--rounds`` rounds, so a noisy neighbour slows all of them alike; the median and range over the
rounds are printed. Every path decodes with the same function and yields the same model-ready
float32 batches. The DataLoader runs twice: as written plainly, and with
``datasets_.pipeline.keep_batch_memory`` in its workers — the allocator setting transferlab's
own training workers and decode tasks use — so the comparison is not won by that setting alone.
``--webdataset`` also times the Ray Data path over the same samples as transferlab WebDataset
tars (the read-unit path that raw sources take too). Run by hand; figures go in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from datasets_ import write_sharded_dataset
from datasets_.pipeline import decode_images, keep_batch_memory, normalize, ray_dataset


def synthetic_dataset(root: str, n: int, size: int, shard_size: int, shard_format: str = "parquet"):
    rng = np.random.default_rng(0)

    def rows():
        for i in range(n):
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield "train", {"key": f"img-{i:07d}", "image": buf.getvalue(), "label": i % 10, "caption": ""}

    return write_sharded_dataset(
        os.path.join(root, f"ds-{shard_format}"),
        "synthetic",
        [str(c) for c in range(10)],
        rows(),
        shard_size,
        shard_format=shard_format,
    )


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
                yield (
                    torch.from_numpy(decode_images(rb.column("image").to_pylist(), self.image_size)),
                    torch.from_numpy(rb.column("label").to_numpy()),
                )


def _keep_batch_memory(_worker_id: int) -> None:
    keep_batch_memory()


def dataloader(ds, image_size: int, batch: int, workers: int, epochs: int, keep_memory: bool = False) -> float:
    loader = torch.utils.data.DataLoader(
        _Shards(ds.files("train"), image_size, batch),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_keep_batch_memory if keep_memory else None,
    )
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        rate = n / (time.perf_counter() - t0)
    return rate


def ray_data(ds, image_size: int, epochs: int, batch: int) -> float:
    """The consumer is what a transferlab training worker does: it sets ``keep_batch_memory``
    (``trainers.pretrain.pretrain_loop`` does) and normalizes each uint8 batch."""
    keep_batch_memory()
    data = ray_dataset(ds, "train", image_size)
    rate = 0.0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in data.iter_torch_batches(batch_size=batch, prefetch_batches=4):
            n += len(normalize(b["image"]))  # model-ready float32, as the DataLoader yields
        rate = n / (time.perf_counter() - t0)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--size", type=int, default=256, help="stored JPEG side")
    p.add_argument("--image-size", type=int, default=224, help="decoded side fed to the model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=2, help="passes per path per round; the last one counts")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which every path takes its turn")
    p.add_argument("--webdataset", action="store_true", help="also time the Ray Data path over WebDataset tars")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} JPEGs of {args.size}px ...", flush=True)
        shard = max(1, args.images // (2 * args.cpus))
        ds = synthetic_dataset(tmp, args.images, args.size, shard_size=shard)
        tars = synthetic_dataset(tmp, args.images, args.size, shard, "webdataset") if args.webdataset else None
        dl = f"torch DataLoader, {args.cpus} workers"
        paths = {
            "raw decode, 1 process": lambda: raw_decode(ds, args.image_size, args.batch),
            dl: lambda: dataloader(ds, args.image_size, args.batch, args.cpus, args.epochs),
            "same, + keep_batch_memory in workers": lambda: dataloader(
                ds, args.image_size, args.batch, args.cpus, args.epochs, True
            ),
            f"transferlab Ray Data path, {args.cpus} CPUs": lambda: ray_data(
                ds, args.image_size, args.epochs, args.batch
            ),
        }
        if tars is not None:
            paths[f"same, WebDataset tars, {args.cpus} CPUs"] = lambda: ray_data(
                tars, args.image_size, args.epochs, args.batch
            )
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, run in paths.items():
                rates[name].append(run())
                print(f"round {r + 1}/{args.rounds}  {name:<40} {rates[name][-1]:6.0f} img/s", flush=True)
        ray.shutdown()
    ratio = {
        name: [a / b for a, b in zip(v, rates[dl])] for name, v in rates.items()
    }  # per round, vs that round's DataLoader
    print(
        f"\n{args.images} JPEG {args.size}px -> float32 3x{args.image_size}x{args.image_size}, batch {args.batch}, "
        f"last of {args.epochs} passes, {args.rounds} rounds: median (min-max)"
    )
    for name, v in rates.items():
        q = ratio[name]
        print(
            f"{name:<40} {statistics.median(v):6.0f} img/s ({min(v):.0f}-{max(v):.0f})   "
            f"{statistics.median(q):5.2f}x DataLoader ({min(q):.2f}-{max(q):.2f})"
        )


if __name__ == "__main__":
    main()
