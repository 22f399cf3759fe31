"""Data layer: shard formats, builtin real datasets, reproducible views, decoding and streams.

Knows nothing of Ray Tune or MLflow.
"""

from datasets_.builtin import BUILTINS, prepare_builtin
from datasets_.objstore import DatasetError
from datasets_.prepare import resolve_dataset
from datasets_.shards import ShardedDataset, open_dataset, write_sharded_dataset
from datasets_.views import (
    PretrainView,
    few_shot_indices,
    in_subset,
    noisy_labels,
    subset_threshold,
    unit_hash,
    validation_mask,
)

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
