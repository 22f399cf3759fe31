"""Results of the report's slow pure functions, kept on disk by the digest of their inputs.

A saturation fit with 200 bootstrap refits, or a matplotlib figure, is a pure function of its
arguments; a report rerun on unchanged runs asks for the same ones again. :class:`Memo` answers
those from a folder (the study's report cache, :mod:`orchestrator.analysis.run_cache`), keyed by
a SHA-256 of the function's name, the source of its module (edit the code and the old results
no longer match) and its arguments (DataFrames by their content, arrays by their bytes). Only
the function's own module is digested: a change in a module it calls (or in matplotlib) is not
seen; ``transferlab report --refresh`` starts the cache afresh.

Two kinds of result are kept, in formats that run no code when read: ``bytes`` (PNG figures) as
files, and JSON-able values (dicts of numbers and lists: fit results) as JSON. A file that cannot
be read counts as absent and is computed again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd


@cache
def _source_digest(module_file: str) -> str:
    return hashlib.sha256(Path(module_file).read_bytes()).hexdigest()


def _feed(h, value) -> None:
    """Hash ``value`` by content, with its type, so ``1`` and ``"1"`` or two frames differ."""
    if isinstance(value, pd.DataFrame):
        h.update(b"df" + json.dumps([list(map(str, value.columns)), list(map(str, value.dtypes))]).encode())
        h.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(b"nd" + str((value.dtype, value.shape)).encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(f"map{len(value)}".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def digest(fn, args: tuple, kwargs: dict) -> str:
    """The key of ``fn(*args, **kwargs)``: its module's source, its name and its arguments."""
    h = hashlib.sha256(_source_digest(inspect.getsourcefile(fn)).encode() + fn.__qualname__.encode())
    _feed(h, args)
    _feed(h, kwargs)
    return h.hexdigest()[:32]


class Memo:
    """``memo(fn, *args, **kwargs)`` is ``fn(*args, **kwargs)``, read from ``folder`` when the
    same call was made before. ``folder=None`` keeps nothing (every call computes); ``refresh``
    computes every call and writes its result over the kept one."""

    def __init__(self, folder: str | Path | None, refresh: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.refresh = refresh
        self.hits = self.misses = 0

    def __call__(self, fn, *args, **kwargs):
        if self.folder is None:
            return fn(*args, **kwargs)
        try:
            key = digest(fn, args, kwargs)
        except TypeError:  # an argument pandas cannot hash (a list in a cell): computed every time
            return fn(*args, **kwargs)
        for suffix, read in ((".png", Path.read_bytes), (".json", lambda p: json.loads(p.read_text()))):
            path = self.folder / f"memo-{key}{suffix}"
            if path.exists() and not self.refresh:
                try:
                    value = read(path)
                    self.hits += 1
                    return value
                except (OSError, ValueError):
                    break  # unreadable: computed again and rewritten below
        value = fn(*args, **kwargs)
        self.misses += 1
        self._write(key, value)
        return value

    def _write(self, key: str, value) -> None:
        if isinstance(value, bytes):
            path, data = self.folder / f"memo-{key}.png", value
        else:
            path, data = self.folder / f"memo-{key}.json", json.dumps(value).encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
