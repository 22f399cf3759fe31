"""Data layer: shard formats, builtin real datasets, reproducible views, decoding and streams.

Knows nothing of Ray Tune or MLflow.
"""

import importlib

# Each name's module, imported on first use (PEP 562): ``import datasets_.objstore`` or a
# command that never decodes an image does not pay for numpy, PIL and pyarrow.
_WHERE = {
    "BUILTINS": "builtin",
    "prepare_builtin": "builtin",
    "DatasetError": "objstore",
    "resolve_dataset": "prepare",
    "ShardedDataset": "shards",
    "open_dataset": "shards",
    "write_sharded_dataset": "shards",
    "PretrainView": "views",
    "few_shot_indices": "views",
    "in_subset": "views",
    "noisy_labels": "views",
    "subset_threshold": "views",
    "unit_hash": "views",
    "validation_mask": "views",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'datasets_' has no attribute {name!r}")
    return getattr(importlib.import_module(f"datasets_.{_WHERE[name]}"), name)


__all__ = [
    "BUILTINS",
    "DatasetError",
    "PretrainView",
    "ShardedDataset",
    "few_shot_indices",
    "in_subset",
    "noisy_labels",
    "open_dataset",
    "prepare_builtin",
    "resolve_dataset",
    "subset_threshold",
    "unit_hash",
    "validation_mask",
    "write_sharded_dataset",
]
