"""Datasets whose images are not in Parquet shards: transferlab's own WebDataset tars and raw
sources read as they are (see :mod:`datasets_.shards` for the two manifest formats).

Keys, labels and captions come from the dataset's index; images are read from the shard files
(local or on an object store) by *read units*: one tar, a run of row groups of a Parquet file, or
a run of image files of a folder. A unit is the
piece of work one Ray Data task reads, or that a local loop reads in turn, so Ray streams and
local reads see the same samples in the same order. Only samples the index lists are emitted:
the scan that wrote it already dropped bad, duplicate and other-split samples.

transferlab's own Parquet shards need no index: :func:`shard_units` cuts them into row ranges
(kind ``shard``) that :func:`iter_unit` reads like the other kinds.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from datasets_.objstore import read_bytes
from datasets_.readers import BadSamples, iter_parquet, iter_webdataset
from datasets_.safety import MAX_IMAGE_BYTES
from datasets_.shards import check_shard, parquet_file

# Samples a read unit holds before the next one starts (image files; Parquet row groups are
# never cut, so a Parquet unit ends at the first row-group boundary past this many samples).
SAMPLES_PER_UNIT = 256


def read_units(dataset, split: str, samples_per_unit: int = SAMPLES_PER_UNIT) -> list[dict]:
    """The read units of a split, in index order, each with its samples' keys, labels, captions.

    A Parquet file with several row groups is cut into units of whole row groups (``row_groups``
    = ``[lo, hi)``), so one big file is read by several tasks; the units' samples, concatenated,
    are the whole-file read's in the same order."""
    kind = {"webdataset": "tar"}.get(dataset.format) or {"folder": "file", "webdataset": "tar", "parquet": "parquet"}[
        dataset.manifest["source_format"]
    ]
    names = ("key", "label", "caption", "shard") + (("row_group",) if kind == "parquet" else ())
    table = dataset.read_split(split, names)
    cols = {c: table.column(c).to_pylist() for c in names}
    digests = {dataset.resolve(s["path"]): s.get("sha256") for s in dataset.manifest["shards"]}
    units: list[dict] = []
    for i, shard in enumerate(cols["shard"]):
        shard = dataset.resolve(shard)
        group = cols["row_group"][i] if kind == "parquet" else None
        last = units[-1] if units else None
        if last is None or (last["paths"][-1] != shard if kind != "file" else len(last["keys"]) >= samples_per_unit):
            new = True
        else:  # a Parquet unit ends at a row-group boundary once it is full
            new = (
                kind == "parquet"
                and group is not None
                and group >= last["row_groups"][1]
                and len(last["keys"]) >= samples_per_unit
            )
        if new:
            units.append(
                {
                    "kind": kind,
                    "paths": [],
                    "keys": [],
                    "labels": [],
                    "captions": [],
                    "columns": dataset.manifest.get("parquet_columns", {}),
                }
            )
            if group is not None:
                units[-1]["row_groups"] = [group, group + 1]
            if kind == "tar":  # transferlab's own tars; a scan's files have no digest
                units[-1]["sha256"] = digests.get(shard)
        u = units[-1]
        if kind == "file" or not u["paths"]:
            u["paths"].append(shard)
        if group is not None:
            u["row_groups"][1] = group + 1
        u["keys"].append(cols["key"][i])
        u["labels"].append(int(cols["label"][i]))
        u["captions"].append(cols["caption"][i] or "")
    return units


def _unit_images(unit: dict) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of the unit's files, in file order (other samples included)."""
    if unit["kind"] == "file":
        # never more than the limit: the scan refused larger files, and one that grew since is
        # cut short here and refused by the decoder
        yield from zip(unit["keys"], (read_bytes(p, MAX_IMAGE_BYTES) for p in unit["paths"]))
    elif unit["kind"] == "tar":
        allow = bool(unit["columns"].get("allow_compressed"))
        check_shard(unit["paths"][0], unit.get("sha256"))
        for s in iter_webdataset(unit["paths"][0], BadSamples(), check_images=False, allow_compressed=allow):
            yield s.key, s.image
    else:
        groups = unit.get("row_groups")
        columns = {k: v for k, v in unit["columns"].items() if k != "allow_compressed"}
        for s in iter_parquet(
            unit["paths"][0],
            BadSamples(),
            check_images=False,
            row_groups=tuple(groups) if groups else None,
            **columns,
        ):
            yield s.key, s.image


def shard_units(dataset, split: str, columns: list[str], rows_per_unit: int | None = None) -> list[dict]:
    """Read units of a transferlab Parquet split: row ranges of at most ``rows_per_unit`` rows of
    each shard (its ``num_rows`` is in the manifest; ``None``: whole shards), so a split of few
    shards is still read by several tasks at once."""
    units = []
    for shard in dataset.manifest["shards"]:
        if shard["split"] != split:
            continue
        n = shard["num_rows"]
        step = rows_per_unit or max(1, n)
        units += [
            {
                "kind": "shard",
                "path": dataset.resolve(shard["path"]),
                "sha256": shard.get("sha256"),
                "rows": [lo, min(n, lo + step)],
                "columns": columns,
            }
            for lo in range(0, n, step)
        ]
    return units


def _shard_rows(unit: dict, batch_size: int) -> Iterator[dict]:
    """Batches of numpy columns of one Parquet row range, images still encoded."""
    lo, hi = unit["rows"]
    check_shard(unit["path"], unit.get("sha256"))
    at = 0
    for rb in parquet_file(unit["path"]).iter_batches(batch_size=batch_size, columns=unit["columns"]):
        first, at = at, at + rb.num_rows
        if at <= lo:
            continue
        if first >= hi:
            break
        rb = rb.slice(max(0, lo - first), min(rb.num_rows, hi - first) - max(0, lo - first))
        yield {
            c: (
                rb.column(c).to_numpy().astype(np.int64)
                if c == "label"
                else np.asarray(rb.column(c).to_pylist(), dtype=object)
            )
            for c in unit["columns"]
        }


def iter_unit(unit: dict, batch_size: int = 256) -> Iterator[dict]:
    """Batches ``{key, image (bytes), label, caption}`` of the unit's indexed samples (a
    :func:`shard_units` unit: its ``columns``)."""
    if unit["kind"] == "shard":
        yield from _shard_rows(unit, batch_size)
        return
    where = {k: i for i, k in enumerate(unit["keys"])}
    rows: list[int] = []
    images: list[bytes] = []

    def batch() -> dict:
        return {
            "key": np.asarray([unit["keys"][i] for i in rows], dtype=object),
            "image": np.asarray(images, dtype=object),
            "label": np.asarray([unit["labels"][i] for i in rows], dtype=np.int64),
            "caption": np.asarray([unit["captions"][i] for i in rows], dtype=object),
        }

    for key, blob in _unit_images(unit):
        i = where.pop(key, None)
        if i is None:
            continue  # not in this split, or dropped by the scan
        rows.append(i)
        images.append(blob)
        if len(rows) >= batch_size:
            yield batch()
            rows, images = [], []
    if rows:
        yield batch()


def iter_encoded(dataset, split: str, batch_size: int = 256, columns=("key", "image", "label")) -> Iterator[dict]:
    """A split's samples as batches of numpy columns (images still encoded), in read order, for
    any dataset format."""
    units = shard_units(dataset, split, list(columns)) if dataset.format == "parquet" else read_units(dataset, split)
    for unit in units:
        for b in iter_unit(unit, batch_size):
            yield {c: b[c] for c in columns}
