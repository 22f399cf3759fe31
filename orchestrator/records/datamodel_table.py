"""A datamodel sweep's table: one row per trained model, as a Parquet dataset in storage.

Layout (documented with the rest of the schema in :mod:`orchestrator.records.schema`)::

    TABLE/sweep.json           class names, config hash, settings
    TABLE/examples.parquet     example, key, label of every target test example
    TABLE/models/models-FIRST-LAST.parquet   one part per finished trial (TABLE_SCHEMA)

Each part is written atomically (:func:`datasets_.objstore.write_atomic`), so a rerun skips
every model index a part holds and a killed trial leaves nothing half-written. ``models/``
holds only parts: ``pandas.read_parquet`` reads it as one table.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from datasets_.objstore import filesystem, write_atomic

SWEEP_FILE, EXAMPLES_FILE = "sweep.json", "examples.parquet"
MODELS_DIR, PART_PREFIX = "models", "models-"

TABLE_SCHEMA = pa.schema(
    [
        ("model", pa.int64()),
        ("seed", pa.int64()),
        ("mask", pa.list_(pa.bool_())),
        ("num_train_samples", pa.int64()),
        ("train_loss", pa.float32()),
        ("accuracy", pa.float32()),
        ("correct_prob", pa.list_(pa.float32())),
        ("margin", pa.list_(pa.float32())),
        ("prediction", pa.list_(pa.int32())),
        # top-1 on the source's held-out split, of the classes the model trained on
        ("upstream_accuracy", pa.float32()),
    ]
)


def table_uri(storage_path: str, study: str, config_hash: str) -> str:
    return f"{storage_path.rstrip('/')}/datamodels/{study}-{config_hash}"


def part_name(models) -> str:
    return f"{PART_PREFIX}{min(models):06d}-{max(models):06d}.parquet"


def write_part(uri: str, models, table: pa.Table) -> str:
    """One finished trial's rows; returns the part's path in its filesystem."""
    return write_atomic(f"{uri.rstrip('/')}/{MODELS_DIR}/{part_name(models)}", lambda f: pq.write_table(table, f))


def _parts(uri: str) -> list[str]:
    fs, root = filesystem(f"{uri.rstrip('/')}/{MODELS_DIR}")
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
    return sorted(i.path for i in infos if i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet"))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """Every finished model's row (sorted by model index), or None if no trial has finished."""
    fs, _ = filesystem(uri)
    parts = [pq.read_table(p, columns=columns, filesystem=fs) for p in _parts(uri)]
    if not parts:
        return None
    # parts written before a column was added lack it: null there
    t = pa.concat_tables(parts, promote_options="default")
    return t.sort_by("model") if "model" in t.column_names else t


def finished_models(uri: str) -> set[int]:
    t = read_table(uri, ["model"])
    return set() if t is None else set(t.column("model").to_pylist())


def read_examples(uri: str) -> pa.Table | None:
    fs, root = filesystem(uri)
    try:
        return pq.read_table(f"{root}/{EXAMPLES_FILE}", filesystem=fs)
    except (FileNotFoundError, OSError):
        return None


def read_sweep(uri: str) -> dict | None:
    fs, root = filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/{SWEEP_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def write_header(uri: str, sweep: dict, examples) -> None:
    """``sweep.json`` (``sweep``) and ``examples.parquet`` (``examples()``, a pyarrow table of
    ``example, key, label``, made only when missing), once per table."""
    if read_sweep(uri) is None:
        write_atomic(f"{uri.rstrip('/')}/{SWEEP_FILE}", lambda f: f.write(json.dumps(sweep, indent=1).encode()))
    if read_examples(uri) is None:
        table = examples()
        write_atomic(f"{uri.rstrip('/')}/{EXAMPLES_FILE}", lambda f: pq.write_table(table, f))
