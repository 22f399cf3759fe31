"""What a pretraining view selects from a training split — its subset threshold(s), how many
samples it keeps, its realized label-noise rate — computed without one process holding the split.

A split is cut into *parts* (one row group of a Parquet shard or of a scan's index). Each part's
holder hashes its own keys (:func:`datasets_.views.unit_hash`) and answers three small questions,
so the planner only ever sees per-bin counts and the handful of hashes inside one bin:

1. a histogram of the eligible samples' subset hashes, over ``BINS`` equal bins, per group (one
   group, or one per class for class-balanced subsets);
2. the hashes inside the bin where the ``size``-th smallest falls;
3. how many samples the final threshold keeps, and how many of them have a flipped label.

The threshold is exact — the same float :func:`~datasets_.views.subset_threshold` and
:func:`~datasets_.views.balanced_thresholds` return over the whole split — so a trial filtering
batch by batch keeps exactly the samples planning counted. Small splits are answered in this
process (``IN_PROCESS_MAX``); larger ones by holders, one per core: Ray actors where this
process is connected to Ray (spread over the cluster when every node can read the files, else
pinned to this node), otherwise processes on this machine. Results are
cached per (dataset, view) fingerprint under ``$TRANSFERLAB_CACHE/view-stats``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from datasets_.objstore import is_remote
from datasets_.shards import ShardedDataset, parquet_file
from datasets_.views import NOISE_PATTERNS, PretrainView, unit_hash

BINS = 1 << 16  # histogram bins of one group; class-balanced views share 2**20 bins over their classes
IN_PROCESS_MAX = 200_000  # samples a split may have to be answered in this process
MAX_HOLDERS = 64  # holders of one split
STATS_VERSION = "1"


@dataclass(frozen=True)
class ViewStats:
    """What one view selects: ``threshold`` (one float, or one per class), ``selected`` samples,
    ``realized_noise`` (share of them whose label flips) and ``captioned`` (samples of the whole
    split with a non-empty caption)."""

    threshold: float | tuple[float, ...]
    selected: int
    realized_noise: float
    captioned: int


class ViewError(ValueError):
    """A view that cannot be drawn from the split: its filters leave nothing (``eligible`` 0),
    or its size asks for more than they leave."""

    def __init__(self, message: str, eligible: int):
        super().__init__(message)
        self.eligible = eligible


def split_parts(ds: ShardedDataset, split: str) -> list[tuple[str, int]]:
    """(file, row group) of every part of a split's key/label/caption columns, in read order
    (row group -1: the whole file, for a prepared dataset's shards of a few thousand rows)."""
    if ds.format == "parquet":
        return [(f, -1) for f in ds.files(split)]
    if split not in ds.manifest.get("index", {}):
        return []
    index = ds.resolve(ds.manifest["index"][split])
    return [(index, g) for g in range(parquet_file(index).metadata.num_row_groups)]


def _bins(view: PretrainView) -> int:
    return max(64, (1 << 20) // view.num_classes) if view.class_balanced else BINS


def _wants(view: PretrainView, per_class: np.ndarray) -> np.ndarray:
    """Samples each group must select (one group, or one per class); raises :class:`ViewError`."""
    size, eligible = view.pretrain_size, int(per_class.sum())
    if eligible == 0:
        raise ViewError("its class and caption filters leave no training sample", 0)
    if size is not None and size < 1:
        raise ViewError(f"subset size must be >= 1, got {size}", eligible)
    if size is None:
        return np.zeros(len(per_class), dtype=np.int64)
    if not view.class_balanced:
        if size > eligible:
            raise ViewError(f"subset size {size} exceeds the {eligible} available samples", eligible)
        return np.array([size])
    classes = np.flatnonzero(per_class)  # the classes left after every filter
    base, extra = divmod(size, len(classes))
    want = np.zeros(view.num_classes, dtype=np.int64)
    for i, c in enumerate(classes):
        want[c] = base + (1 if i < extra else 0)
        if want[c] > per_class[c]:
            raise ViewError(
                f"class {c} has {per_class[c]} samples, fewer than the {want[c]} a balanced subset of {size} needs",
                eligible,
            )
    return want


class SplitColumns:
    """The key, label (and caption) columns of some parts of a split, with their hashes cached
    per seed: the holder that answers a planner's questions (in this process or as a Ray actor)."""

    def __init__(self, parts: Sequence[tuple[str, int]], captions: bool):
        names = ["key", "label"] + (["caption"] if captions else [])
        tables = [
            parquet_file(f).read(columns=names) if g < 0 else parquet_file(f).read_row_group(g, columns=names)
            for f, g in parts
        ]
        t = pa.concat_tables(tables) if tables else pa.table({n: pa.array([], pa.string()) for n in names})
        self.keys = t.column("key").to_pylist()
        self.labels = t.column("label").to_numpy().astype(np.int64) if len(t) else np.zeros(0, np.int64)
        self.captions = t.column("caption").to_pylist() if captions else None
        self._hashes: dict[tuple[int, str], np.ndarray] = {}

    def _hash(self, seed: int, salt: str) -> np.ndarray:
        if (seed, salt) not in self._hashes:
            self._hashes[seed, salt] = unit_hash(self.keys, seed, salt)
        return self._hashes[seed, salt]

    def _groups(self, view: PretrainView) -> np.ndarray:
        return self.labels if view.class_balanced else np.zeros(len(self.labels), dtype=np.int64)

    def histogram(self, view: PretrainView) -> tuple[np.ndarray, int]:
        """(eligible samples per group and subset-hash bin, samples with a non-empty caption)."""
        eligible = view.eligible(self.labels, self.captions)
        groups = view.num_classes if view.class_balanced else 1
        b = _bins(view)
        u = self._hash(view.seed, "subset")[eligible]
        cell = self._groups(view)[eligible] * b + np.minimum((u * b).astype(np.int64), b - 1)
        hist = np.bincount(cell, minlength=groups * b).astype(np.int32).reshape(groups, b)
        captioned = sum(1 for c in self.captions if isinstance(c, str) and c.strip()) if self.captions else 0
        return hist, captioned

    def in_bins(self, view: PretrainView, bins: np.ndarray) -> list[np.ndarray]:
        """Subset hashes of the eligible samples of each group that fall in that group's bin
        (``bins[g] < 0``: none wanted)."""
        eligible = view.eligible(self.labels, self.captions)
        b = _bins(view)
        u = self._hash(view.seed, "subset")
        g = self._groups(view)
        cell = np.minimum((u * b).astype(np.int64), b - 1)
        return [u[eligible & (g == i) & (cell == bins[i])] if bins[i] >= 0 else u[:0] for i in range(len(bins))]

    def counts(self, view: PretrainView, threshold) -> tuple[int, int]:
        """(samples the view keeps at ``threshold``, how many of them get a flipped label)."""
        keep = view.eligible(self.labels, self.captions)
        if isinstance(threshold, (tuple, list, np.ndarray)):
            keep &= self._hash(view.seed, "subset") <= np.asarray(threshold, dtype=np.float64)[self.labels]
        elif threshold < 1.0:
            keep &= self._hash(view.seed, "subset") <= threshold
        flips = 0
        if view.label_noise > 0 and view.num_classes >= 2 and view.noise_pattern in NOISE_PATTERNS:
            # Both patterns move a flipped label to another class, so flips are the realized noise.
            flips = int((keep & (self._hash(view.seed, "noise-flip") < view.label_noise)).sum())
        return int(keep.sum()), flips


def _merge_thresholds(view: PretrainView, want: np.ndarray, hist: np.ndarray, ask) -> float | tuple[float, ...]:
    """Exact thresholds from the summed histogram: find each group's bin holding its
    ``want``-th smallest hash, then ask the holders for the hashes inside it."""
    if view.pretrain_size is None:
        return 1.0
    cum = np.cumsum(hist, axis=1, dtype=np.int64)
    bins = np.full(len(want), -1, dtype=np.int64)
    rank = np.zeros(len(want), dtype=np.int64)
    for g, w in enumerate(want):
        if w > 0:
            bins[g] = int(np.searchsorted(cum[g], w))
            rank[g] = w - (cum[g, bins[g] - 1] if bins[g] > 0 else 0)
    inside = ask(bins)  # per holder: a list over groups of hash arrays
    out = []
    for g in range(len(want)):
        if bins[g] < 0:
            out.append(-1.0)
            continue
        values = np.sort(np.concatenate([h[g] for h in inside]))
        out.append(float(values[rank[g] - 1]))
    return tuple(out) if view.class_balanced else out[0]


def _answer(view: PretrainView, histograms, ask_bins, ask_counts) -> ViewStats:
    hist = sum(h for h, _ in histograms)
    captioned = sum(c for _, c in histograms)
    per_class = hist.sum(axis=1)
    want = _wants(view, per_class)
    threshold = _merge_thresholds(view, want, hist, ask_bins)
    counts = ask_counts(threshold)
    selected = sum(s for s, _ in counts)
    flips = sum(f for _, f in counts)
    return ViewStats(threshold, selected, flips / selected if selected else 0.0, captioned)


def _encode(obj, arrays: list):
    """``obj`` as JSON, its arrays replaced by their index in ``arrays`` (the wire format of
    holder processes: JSON and raw numeric buffers, nothing that could run code when read)."""
    if isinstance(obj, np.ndarray):
        arrays.append(np.ascontiguousarray(obj))
        return {"nd": len(arrays) - 1}
    if isinstance(obj, PretrainView):
        return {"view": _encode(asdict(obj), arrays)}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(x, arrays) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, arrays) for x in obj]
    if isinstance(obj, dict):
        return {"dict": {k: _encode(v, arrays) for k, v in obj.items()}}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj, arrays: list):
    if isinstance(obj, list):
        return [_decode(x, arrays) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "nd" in obj:
        return arrays[obj["nd"]]
    if "tuple" in obj:
        return tuple(_decode(x, arrays) for x in obj["tuple"])
    if "view" in obj:
        return PretrainView(**_decode(obj["view"], arrays))
    return {k: _decode(v, arrays) for k, v in obj["dict"].items()}


def _send(f, obj) -> None:
    arrays: list[np.ndarray] = []
    head = json.dumps({"body": _encode(obj, arrays), "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}).encode()
    f.write(struct.pack("<Q", len(head)) + head)
    for a in arrays:
        f.write(a.tobytes())
    f.flush()


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _receive(f):
    head = json.loads(_read_exactly(f, struct.unpack("<Q", _read_exactly(f, 8))[0]))
    arrays = []
    for dtype, shape in head["arrays"]:
        dt = np.dtype(dtype)
        if dt.kind not in "biuf":
            raise ValueError(f"a planning process sent a {dt} array")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arrays.append(np.frombuffer(_read_exactly(f, n), dtype=dt).reshape(shape))
    return _decode(head["body"], arrays)


def serve() -> None:
    """A holder process (``python -c "from datasets_.view_stats import serve; serve()"``): reads
    its parts from stdin, then answers (method, args) questions until it reads None."""
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    sys.stdout = sys.stderr  # nothing else may write into the answers
    parts, captions = _receive(inp)
    holder = SplitColumns([tuple(p) for p in parts], captions)
    while (msg := _receive(inp)) is not None:
        method, args = msg
        if method not in ("histogram", "in_bins", "counts"):
            answer = (False, f"unknown question {method!r}")
        else:
            try:
                answer = (True, getattr(holder, method)(*args))
            except Exception as e:
                answer = (False, f"{type(e).__name__}: {e}")
        _send(out, answer)


class _Holders:
    """Parts of a split spread over holders, each asked the same question at once: this process
    (small splits), Ray actors (when this process is connected to Ray: a study's driver, a
    submitted job — spread over the cluster when every node can read the files, else on this
    node), or processes on this machine (``plan`` and ``validate``, where starting Ray would
    cost more than the hashing)."""

    def __init__(self, parts: list[tuple[str, int]], captions: bool, where: str):
        self.local, self.actors, self.procs = None, None, None
        if where == "here" or len(parts) <= 1:
            self.local = [SplitColumns(parts, captions)]
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if where == "ray":
            self._start_actors(sys.modules["ray"], parts, captions, cores)
            return
        # Fresh interpreters that import only the data layer (not forked: no inherited threads).
        n = max(1, min(len(parts), cores, MAX_HOLDERS))
        cmd = [sys.executable, "-c", "from datasets_.view_stats import serve; serve()"]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
        for i, p in enumerate(self.procs):
            _send(p.stdin, (parts[i::n], captions))

    def _start_actors(self, ray, parts, captions: bool, cores: int) -> None:
        self.ray = ray
        if all(is_remote(f) for f, _ in parts):  # every node can read them: spread over the cluster
            n = max(1, min(len(parts), int(ray.cluster_resources().get("CPU", 1)), MAX_HOLDERS))
            options = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        else:  # files on this node's disk: holders run here, beside the planner
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            n = max(1, min(len(parts), cores, MAX_HOLDERS))
            node = ray.get_runtime_context().get_node_id()
            options = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        holder = ray.remote(SplitColumns).options(**options)
        self.actors = [holder.remote(parts[i::n], captions) for i in range(n)]

    def call(self, method: str, *args) -> list:
        if self.local is not None:
            return [getattr(h, method)(*args) for h in self.local]
        if self.actors is not None:
            return self.ray.get([getattr(a, method).remote(*args) for a in self.actors])
        for p in self.procs:
            _send(p.stdin, (method, args))
        out = []
        for p in self.procs:
            try:
                ok, value = _receive(p.stdout)
            except EOFError:
                raise RuntimeError(f"a planning process died (exit code {p.wait()})") from None
            if not ok:
                raise RuntimeError(f"a planning process failed: {value}")
            out.append(value)
        return out

    def close(self) -> None:
        for a in self.actors or ():
            self.ray.kill(a)
        for p in self.procs or ():
            try:
                _send(p.stdin, None)
                p.stdin.close()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()


def _cache_path(ds: ShardedDataset, view: PretrainView) -> str:
    from datasets_.builtin import cache_dir

    return str(cache_dir() / "view-stats" / f"{ds.fingerprint}-{view.fingerprint}-v{STATS_VERSION}.json")


def _load_cached(path: str) -> ViewStats | None:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    t = d["threshold"]
    return ViewStats(tuple(t) if isinstance(t, list) else t, d["selected"], d["realized_noise"], d["captioned"])


def _store(path: str, stats: ViewStats) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({**stats.__dict__, "threshold": stats.threshold}, f)
    os.replace(tmp, path)


def view_statistics(
    ds: ShardedDataset,
    views: Sequence[PretrainView],
    split: str = "train",
    use_cache: bool = True,
    where: str | None = None,
) -> list[ViewStats | ViewError]:
    """:class:`ViewStats` of each view over ``split`` (or the :class:`ViewError` saying why it
    cannot be drawn), reading the split once for all of them.

    ``where`` the split is read: ``here`` (this process), ``ray`` (actors of the Ray this process
    is connected to) or ``processes`` (on this machine); default: ``here`` up to
    ``IN_PROCESS_MAX`` samples, else ``ray`` when connected, else ``processes``."""
    if where is None:
        ray = sys.modules.get("ray")
        connected = ray is not None and ray.is_initialized()
        where = "here" if ds.num_samples(split) <= IN_PROCESS_MAX else "ray" if connected else "processes"
    out: dict[int, ViewStats | ViewError] = {}
    todo = []
    for i, v in enumerate(views):
        cached = _load_cached(_cache_path(ds, v)) if use_cache else None
        if cached is not None:
            out[i] = cached
        else:
            todo.append(i)
    if todo:
        captions = any(views[i].needs_captions or views[i].caption_noise > 0 for i in todo)
        holders = _Holders(split_parts(ds, split), captions, where)
        try:
            for i in todo:
                v = views[i]
                try:
                    out[i] = _answer(
                        v,
                        holders.call("histogram", v),
                        lambda bins, v=v: holders.call("in_bins", v, bins),
                        lambda t, v=v: holders.call("counts", v, t),
                    )
                except ViewError as e:
                    out[i] = e
                    continue
                if use_cache:
                    _store(_cache_path(ds, v), out[i])
        finally:
            holders.close()
    return [out[i] for i in range(len(views))]
