"""Data pre-flight: open every dataset a spec names and check that the study can run on it,
before anything is computed. Every problem is a :class:`~orchestrator.spec.SpecError` naming
the field that needs changing."""

from __future__ import annotations

import sys

from datasets_ import DatasetError, ShardedDataset, resolve_dataset, validation_mask
from datasets_.views import influence_holdout
from orchestrator.spec import SpecError, StudySpec
from trainers.protocols import FULL


def resolve_data(spec: StudySpec) -> dict[str, ShardedDataset]:
    """Open (or, for builtins, prepare) every dataset the spec names: ``{"sources.NAME": ...,
    "tasks.NAME": ...}``; errors name the field."""
    out: dict[str, ShardedDataset] = {}
    for section, refs in (("sources", spec.sources), ("tasks", spec.tasks)):
        for name, ref in refs.items():
            try:
                out[f"{section}.{name}"] = resolve_dataset(ref.uri, **ref.columns)
            except DatasetError as e:
                raise SpecError(f"{section}.{name}.uri", str(e)) from None
    return out


def smallest_class(task: ShardedDataset, val_fraction: float, influence_fraction: float = 0.0) -> tuple[int, str]:
    """(examples, name) of the task's class with the fewest training examples outside the
    validation carve-out (and a datamodel sweep's influence holdout): the most shots per class
    any fit can draw."""
    train = task.keys_and_labels("train")
    keep = ~validation_mask(train.keys, val_fraction)
    if influence_fraction:
        keep &= ~influence_holdout(train.keys, influence_fraction)
    pool = train.labels[keep]
    counts = [int((pool == c).sum()) for c in range(task.num_classes)]
    smallest = min(counts)
    return smallest, task.classes[counts.index(smallest)]


def check_data(spec: StudySpec, data: dict[str, ShardedDataset], shots: tuple = ()) -> None:
    """Labels, sizes, held-out splits and ``shots`` (default: ``transfer.shots``) fit the data."""
    shots = shots or spec.transfer.shots
    for section, names in (("sources", spec.pretrain.sweep["source"]), ("tasks", spec.transfer_tasks)):
        for name in names:
            ds = data[f"{section}.{name}"]
            unlabeled = ds.manifest["splits"].get("train", {}).get("unlabeled", 0)
            if ds.num_classes < 2 or unlabeled:
                raise SpecError(
                    f"{section}.{name}.uri",
                    f"'{name}' needs integer labels of at least 2 classes "
                    f"({ds.num_classes} classes, {unlabeled} unlabeled training samples)",
                )
    for source in spec.pretrain.sweep["source"]:
        ds = data[f"sources.{source}"]
        n = ds.num_samples("train")
        for g, grid in enumerate(spec.pretrain.grids):
            for i, size in enumerate(grid["pretrain_size"] if source in grid["source"] else ()):
                if size is not None and size > n:
                    raise SpecError(
                        f"{spec.pretrain.grid_path(g)}.pretrain_size[{i}]",
                        f"{size} exceeds the {n} training samples of source '{source}'",
                    )
        if ds.num_samples("test") == 0:
            raise SpecError(
                f"sources.{source}.uri", f"source '{source}' has no held-out test split for upstream accuracy"
            )
    for task in spec.transfer_tasks:
        ds = data[f"tasks.{task}"]
        smallest, cls = smallest_class(ds, spec.transfer.val_fraction)
        for i, k in enumerate(shots):
            if k != FULL and k > smallest:
                raise SpecError(
                    f"transfer.shots[{i}]",
                    f"{k} shots exceed the {smallest} training examples of class '{cls}' in task '{task}'",
                )
        if ds.num_samples("test") == 0:
            raise SpecError(f"tasks.{task}.uri", f"task '{task}' has no test split")


def check_overlap(spec: StudySpec, data: dict[str, ShardedDataset]) -> None:
    """Leakage pre-flight: duplicates between each source's train split and each task's test split."""
    from datasets_.overlap import find_overlap

    for source in spec.pretrain.sweep["source"]:
        for task in spec.transfer_tasks:
            r = find_overlap(data[f"sources.{source}"], data[f"tasks.{task}"], a_splits=("train",), b_splits=("test",))
            if not r["pairs"]:
                continue
            p = r["pairs"][0]
            msg = (
                f"source '{source}' (train) and task '{task}' (test) share {r['exact']} exact and {r['near']} "
                f"near-duplicate image(s), e.g. {p['a_key']} ~ {p['b_key']}; see `transferlab data overlap`"
            )
            if spec.preflight_overlap == "error":
                raise SpecError("preflight_overlap", msg)
            print(f"warning: {msg}", file=sys.stderr)
