"""From shards to model-ready batches: image decoding, and the Ray Data streams that feed
training workers.

Every image becomes 3-channel at ``image_size`` so models transfer across grayscale and colour
data. Ray Data streams carry ``{"image": uint8 [B, 3, S, S], "label": int64 [B]}`` — a quarter of
the bytes of float32 through the object store — and the consumer applies :func:`normalize` (on
the GPU, when there is one). Local helpers return normalized float32 directly.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datasets_.indexed import iter_encoded, iter_unit, read_units, shard_units
from datasets_.objstore import DatasetError
from datasets_.safety import IMAGE_FORMATS, MAX_IMAGE_BYTES, too_many_bytes, too_many_pixels
from datasets_.shards import ShardedDataset
from datasets_.views import PretrainView, swapped_captions

# Normalization to roughly [-1, 1]; one constant for every dataset keeps features comparable.
MEAN, STD = 0.5, 0.5


def decode_uint8(blobs, image_size: int) -> np.ndarray:
    """Decode encoded images (PNG/JPEG/WebP bytes) into a uint8 NCHW array, resized."""
    out = np.empty((len(blobs), 3, image_size, image_size), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        reason = too_many_bytes("image", len(blob), MAX_IMAGE_BYTES)
        if reason:
            raise DatasetError(f"refusing to decode image {i} of the batch: {reason}")
        try:
            with warnings.catch_warnings():  # refused below, with a reason, rather than warned about
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise DatasetError(f"refusing to decode image {i} of the batch: image too large: {e}") from None
        with img:
            # Shards may come from anyone: check the declared size before decoding a pixel.
            reason = too_many_pixels(img)
            if reason:
                raise DatasetError(f"refusing to decode image {i} of the batch: {reason}")
            if img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            out[i] = np.asarray(img).transpose(2, 0, 1)
    return out


def normalize(images):
    """uint8 images (numpy or torch, any device) -> float32 in roughly [-1, 1]."""
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) * (1.0 / (255.0 * STD)) - MEAN / STD
    return images.float().mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)


_MALLOPT_DONE = False


def keep_batch_memory() -> bool:
    """Let this process reuse freed batch-sized buffers instead of mapping fresh pages for each.

    A float32 batch of 64 images at 224 px is 38.5 MB, above glibc's largest automatic mmap
    threshold (32 MiB): every :func:`normalize` of such a batch maps new memory and page-faults
    it in (measured: 0.30 ms per image, vs 0.07 ms once reused) — a third of the decode cost,
    paid on the training worker's critical path on CPU. Raising the mmap and trim thresholds to
    1 GiB keeps those pages in the heap for the next batch; the price is that up to 1 GiB of
    freed memory stays with the process. Linux/glibc only; a no-op elsewhere and when
    ``TRANSFERLAB_KEEP_BATCH_MEMORY=0``. Returns whether the thresholds were set.
    """
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return True
    if os.environ.get("TRANSFERLAB_KEEP_BATCH_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries: leave them alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _MALLOPT_DONE = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _MALLOPT_DONE


def decode_images(blobs, image_size: int) -> np.ndarray:
    """Decode encoded images into a normalized float32 NCHW array."""
    return normalize(decode_uint8(blobs, image_size))


def training_captions(
    keys, captions, labels: np.ndarray, prompts: Sequence[str], view: PretrainView | None
) -> tuple[list[str], np.ndarray]:
    """The text an image-text model trains on, and which samples got another sample's caption:
    each sample's caption, or ``prompts[label]`` (its class's prompt, by the possibly noisy
    label) where it has none.

    A view's ``caption_noise`` swaps that fraction of the batch's captions among themselves
    (:func:`datasets_.views.swapped_captions`, decided by key hash); label noise reaches only
    the class prompts of uncaptioned samples.
    """
    caps = [
        c if isinstance(c, str) and c.strip() else None
        for c in (captions if captions is not None else [None] * len(labels))
    ]
    have = [i for i, c in enumerate(caps) if c is not None]
    changed = np.zeros(len(caps), dtype=np.uint8)
    if view is not None and view.caption_noise > 0 and have:
        swapped = swapped_captions([keys[i] for i in have], [caps[i] for i in have], view.caption_noise, view.seed)
        for i, c in zip(have, swapped):
            changed[i] = c != caps[i]
            caps[i] = c
    return [c if c is not None else prompts[int(y)] for c, y in zip(caps, labels)], changed


@dataclass(frozen=True)
class TextInput:
    """What image-text training adds to each batch: ``tokenize`` (a picklable function of a list
    of strings to an int array or tensor [N, context], e.g. the model's tokenizer) applied to
    :func:`training_captions` with ``prompts`` (one caption per class, for samples without one).
    The data layer knows no tokenizer of its own: the trainer passes its own in, as open_clip's
    ``get_data(..., tokenizer=)`` takes one."""

    tokenize: Callable[[list[str]], object]
    prompts: tuple[str, ...]


def _view_and_decode(batch: dict, view: PretrainView | None, image_size: int, text: TextInput | None = None) -> dict:
    labels = np.asarray(batch["label"], dtype=np.int64)
    images = batch["image"]
    keys = list(batch["key"])
    captions = list(batch["caption"]) if "caption" in batch else None
    if view is not None:
        keep, labels = view.apply(keys, labels, captions)
        labels = labels[keep]
        images = [b for b, k in zip(images, keep) if k]
        keys = [x for x, k in zip(keys, keep) if k]
        captions = [c for c, k in zip(captions, keep) if k] if captions is not None else None
    out = {"image": decode_uint8(images, image_size), "label": labels}
    if text is not None:
        texts, changed = training_captions(keys, captions, labels, text.prompts, view)
        out["tokens"] = np.asarray(text.tokenize(texts))
        if view is not None and view.caption_noise > 0:
            out["caption_swapped"] = changed  # the loop reports the realized rate from these
    return out


def decode_slots() -> int:
    """Decode tasks to run at once: the cores this process may run on, and no more than the CPUs
    Ray grants the cluster (a container sees its host's cores; Ray counts what it was given)."""
    import ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if ray.is_initialized():
        cores = min(cores, int(ray.cluster_resources().get("CPU", cores)))
    return max(1, cores)


def ray_dataset(
    dataset: ShardedDataset,
    split: str,
    image_size: int,
    view: PretrainView | None = None,
    decode_batch_size: int = 256,
    task_cpus: float = 0.25,
    concurrency: int | None = None,
    text: TextInput | None = None,
):
    """A lazily streamed Ray Dataset of decoded uint8 batches of one split, with an optional view.

    With ``text`` (image-text pretraining), batches also carry ``tokens`` (int [B, context]): the
    captions of :func:`training_captions`, tokenized by ``text.tokenize``.

    Nothing is materialized: each Ray Data task reads one read unit (a row range of a Parquet
    shard, a tar, a run of image files), filters it to the view, relabels and decodes it, while
    training consumes the blocks (docs/benchmarks.md: 1.17x a plain DataLoader on 2 cores).
    ``task_cpus`` is the CPU reservation of each read/decode task: fractional, so that training
    workers holding whole CPUs never leave ingest with too little to schedule a task (which
    hangs silently). ``concurrency`` caps the decode tasks running at once (default:
    :func:`decode_slots`): fractional reservations alone let Ray start four decoders per core,
    which thrash (measured: 236 vs 790 img/s on 2 cores).
    """
    import ray.data

    decode = functools.partial(_view_and_decode, view=view, image_size=image_size, text=text)
    concurrency = concurrency or decode_slots()
    if dataset.format == "parquet":
        wants_caption = text is not None or (view is not None and view.needs_captions)
        columns = ["key", "image", "label"] + (["caption"] if wants_caption else [])
        units = shard_units(
            dataset, split, columns, max(decode_batch_size, -(-dataset.num_samples(split) // (4 * concurrency)))
        )
    else:
        units = read_units(dataset, split)
    # One operator, one task per read unit: the task reads its unit, applies the view and
    # decodes, yielding a block per ``decode_batch_size`` samples. Encoded bytes never pass
    # through the object store, and there is no second operator whose tasks wait for the
    # executor's scheduling loop to be started (measured on 2 cores: ~130 ms lost per task).
    items = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=max(1, len(units)))
    return items.map_batches(
        functools.partial(_read_and_decode, units=units, decode=decode, batch_size=decode_batch_size),
        batch_size=1,
        batch_format="numpy",
        num_cpus=task_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )


def _read_and_decode(batch: dict, units: list[dict], decode, batch_size: int) -> Iterator[dict]:
    keep_batch_memory()  # a decoded block of 256 at 224 px is 38.5 MB: reuse it, do not re-map it
    for i in batch["unit"]:
        for b in iter_unit(units[int(i)], batch_size):
            out = decode(b)
            if len(out["label"]):
                yield out


def may_hold_decoded(num_samples: int, image_size: int) -> bool:
    """Whether ``num_samples`` images decoded at ``image_size`` (uint8, N · 3 · S² bytes) may be
    held in one process: at most ``TRANSFERLAB_MAX_HELD_IMAGE_BYTES`` (default 2 GiB). Larger
    splits are streamed batch by batch instead (transfer trials) or not packed (pretraining)."""
    return num_samples * 3 * image_size**2 <= int(os.environ.get("TRANSFERLAB_MAX_HELD_IMAGE_BYTES", 2 << 30))


def decode_split(dataset: ShardedDataset, split: str, image_size: int, batch_size: int = 256):
    """A whole split decoded in this process, in read order, for any dataset format:
    (uint8 images [N, 3, S, S] as a torch tensor, int64 labels, keys)."""
    import torch

    imgs, keys, ys = [], [], []
    for b in iter_encoded(dataset, split, batch_size):
        imgs.append(decode_uint8(list(b["image"]), image_size))
        keys += list(b["key"])
        ys.append(b["label"])
    return torch.from_numpy(np.concatenate(imgs)), np.concatenate(ys), np.asarray(keys, dtype=str)


def decode_rows(dataset: ShardedDataset, split: str, image_size: int, rows, batch_size: int = 256):
    """uint8 images [len(rows), 3, S, S] (a torch tensor) of the samples at positions ``rows``
    of a split (read order), in the order of ``rows``: the split is read batch by batch and only
    those rows are decoded, so memory holds them and one encoded batch."""
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    out = np.empty((len(rows), 3, image_size, image_size), dtype=np.uint8)
    start = done = 0
    for b in iter_encoded(dataset, split, batch_size, columns=("key", "image")):
        if done == len(wanted):
            break
        end = start + len(b["image"])
        hi = int(np.searchsorted(wanted, end))
        if hi > done:
            out[order[done:hi]] = decode_uint8([b["image"][i - start] for i in wanted[done:hi]], image_size)
            done = hi
        start = end
    if done < len(wanted):
        raise IndexError(f"{dataset.name}/{split}: row {int(wanted[done])} is past the split's {start} samples")
    return torch.from_numpy(out)


def iter_local_batches(dataset: ShardedDataset, split: str, image_size: int, batch_size: int = 256) -> Iterator[dict]:
    """Decode a split in this process, in file order, with keys (for small downstream tasks)."""
    for b in iter_encoded(dataset, split, batch_size):
        yield {"key": b["key"], "image": decode_images(list(b["image"]), image_size), "label": b["label"]}
