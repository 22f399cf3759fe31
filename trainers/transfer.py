"""Transfer evaluation of a pretrained checkpoint on a downstream task.

Features are extracted once per (checkpoint, task); every (shots, seed) probe is then fitted
from them. The task's train split is divided, by key hash, into a validation part (chooses the
probe's L2 strength) and a pool the shots are drawn from; the test split is only scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datasets_.pipeline import iter_local_batches
from datasets_.shards import ShardedDataset
from datasets_.views import few_shot_indices, validation_mask
from trainers.pretrain import load_model
from trainers.probe import ridge_few_shot

FULL = "full"


@dataclass
class Features:
    keys: np.ndarray
    x: np.ndarray
    y: np.ndarray


@torch.no_grad()
def extract_features(model, dataset: ShardedDataset, split: str, image_size: int, batch_size: int = 256) -> Features:
    keys, xs, ys = [], [], []
    for batch in iter_local_batches(dataset, split, image_size, batch_size):
        xs.append(model.features(torch.from_numpy(batch["image"])).float().numpy())
        keys.append(batch["key"])
        ys.append(batch["label"])
    return Features(np.concatenate(keys), np.concatenate(xs).astype(np.float64), np.concatenate(ys))


def shot_indices(keys: np.ndarray, labels: np.ndarray, shots, seed: int, num_classes: int) -> np.ndarray:
    """Indices (into ``keys``) of the training examples for one probe fit."""
    if shots == FULL:
        return np.arange(len(keys))
    return few_shot_indices(keys, labels, int(shots), seed, num_classes)


def linear_probe_grid(
    checkpoint_dir: str,
    task: ShardedDataset,
    image_size: int,
    fits: list[tuple[int | str, int]],
    val_fraction: float = 0.2,
) -> list[dict]:
    """Closed-form ridge probes for every (shots, seed) in ``fits``, from one feature pass.

    Returns one dict per fit with ``shots``, ``seed``, ``accuracy``, ``mean_per_class_accuracy``,
    ``validation_accuracy``, ``l2_reg`` and ``num_train_examples``.
    """
    model = load_model(checkpoint_dir)
    train = extract_features(model, task, "train", image_size)
    test = extract_features(model, task, "test", image_size)
    val = validation_mask(train.keys, val_fraction)
    pool_keys, pool_x, pool_y = train.keys[~val], train.x[~val], train.y[~val]
    results = []
    for shots, seed in fits:
        idx = shot_indices(pool_keys, pool_y, shots, seed, task.num_classes)
        r = ridge_few_shot(pool_x[idx], pool_y[idx], train.x[val], train.y[val], test.x, test.y, task.num_classes)
        results.append(
            {
                "shots": shots,
                "seed": seed,
                "accuracy": r.accuracy,
                "mean_per_class_accuracy": r.mean_per_class_accuracy,
                "validation_accuracy": r.validation_accuracy,
                "l2_reg": r.l2_reg,
                "num_train_examples": int(len(idx)),
            }
        )
    return results
