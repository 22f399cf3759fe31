"""The plan of a datamodel sweep (Jain et al. 2022): which classes each of ``num_models`` small
models trains on, with which seed, and how each is probed.

Model i trains on the classes :func:`~orchestrator.planning.pretrain_runs.kept_classes` picks
for seed ``model_seed(seed, i)`` — the same pure, seeded class-subset view a ``class_fraction``
sweep uses — so the masks are a function of the spec alone.

Influence is measured on the :data:`INFLUENCE_FRACTION` of the task's *train* split held out by
key hash (:func:`datasets_.views.influence_holdout`); the probes train and select on the rest,
and the task's test split is left to the counterfactual follow-up, which the influence chose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from datasets_ import ShardedDataset
from orchestrator.planning.data_checks import smallest_class
from orchestrator.planning.hashing import content_hash
from orchestrator.planning.pretrain_runs import checked_model_config, kept_classes
from orchestrator.records.schema import KIND_DATAMODELS, OUTPUTS_INFLUENCE_HOLDOUT, PARAM_OUTPUTS_SPLIT
from orchestrator.spec import MAX_DATAMODELS, PretrainSettings, SpecError, StudySpec
from trainers.protocols import FULL
from trainers.stacked import TrainSettings

INFLUENCE_FRACTION = 0.2  # share of the task's train split held out to measure influence on


@dataclass(frozen=True)
class DatamodelPlan:
    """Everything a datamodel sweep needs: the models' class masks and seeds, and where data lives."""

    config_hash: str  # of everything but num_models and models_per_trial: a larger sweep extends this one
    source: str  # the plan's data['sources.' + source]
    task: str  # the plan's data['tasks.' + task]
    classes: tuple[str, ...]  # the source's classes (mask columns)
    settings: PretrainSettings
    train: TrainSettings  # what the stacked trainer gets, as it is
    model_config: dict
    masks: np.ndarray  # bool [num_models, classes]
    seeds: tuple[int, ...]  # model init and data order of each model
    protocol: str
    shots: int | str
    transfer_seed: int
    val_fraction: float
    influence_fraction: float  # of the task's train split, held out: the examples outputs are recorded on
    models_per_trial: int
    run_name: str

    @property
    def num_models(self) -> int:
        return len(self.seeds)

    def params(self, spec: StudySpec) -> dict:
        d = spec.datamodels
        return {
            "source": self.source,
            "task": self.task,
            "class_fraction": d.class_fraction,
            "seed": d.seed,
            "models_per_trial": self.models_per_trial,
            "protocol": self.protocol,
            "shots": self.shots,
            "transfer_seed": self.transfer_seed,
            "val_fraction": self.val_fraction,
            "influence_fraction": self.influence_fraction,
            PARAM_OUTPUTS_SPLIT: OUTPUTS_INFLUENCE_HOLDOUT,
            **asdict(self.settings),
            "model_config": self.model_config,
        }


def model_seed(seed: int, index: int) -> int:
    return seed * MAX_DATAMODELS + index


def build_datamodel_plan(spec: StudySpec, data: dict[str, ShardedDataset]) -> DatamodelPlan:
    """The sweep of a datamodels spec: masks from the class-subset view, checked against the data."""
    d = spec.datamodels
    src, task = data[f"sources.{d.source}"], data[f"tasks.{d.task}"]
    ref = spec.sources[d.source]
    settings = spec.pretrain.base
    seeds = tuple(model_seed(d.seed, i) for i in range(d.num_models))
    masks = np.zeros((d.num_models, src.num_classes), dtype=bool)
    for i, s in enumerate(seeds):
        kept = kept_classes(ref, src, d.class_fraction, s)
        masks[i, list(range(src.num_classes)) if kept is None else list(kept)] = True
    if masks.all(axis=0).all():
        raise SpecError(
            "datamodels.class_fraction",
            f"{d.class_fraction:g} of the {src.num_classes} classes of '{d.source}' keeps every class",
        )
    if d.shots != FULL:
        smallest, _ = smallest_class(task, spec.transfer.val_fraction, INFLUENCE_FRACTION)
        if d.shots > smallest:
            raise SpecError(
                "datamodels.shots",
                f"{d.shots} shots exceed the {smallest} training examples of the smallest class of task '{d.task}'",
            )
    mcfg = checked_model_config(settings, "pretrain.width")
    h = content_hash(
        {
            "kind": KIND_DATAMODELS,
            "settings": settings.hashed(),
            "model_config": mcfg,
            "source": src.fingerprint,
            "keep": ref.keep_classes,
            "drop": ref.drop_classes,
            "class_fraction": d.class_fraction,
            "seed": d.seed,
            "task": task.fingerprint,
            "protocol": d.protocol,
            "shots": d.shots,
            "transfer_seed": d.transfer_seed,
            "val_fraction": spec.transfer.val_fraction,
            "influence_fraction": INFLUENCE_FRACTION,
        }
    )
    train = TrainSettings(**{f.name: getattr(settings, f.name) for f in fields(TrainSettings)})
    name = f"datamodels {d.source} -> {d.task} alpha={d.class_fraction:g} seed={d.seed}"
    return DatamodelPlan(
        h,
        d.source,
        d.task,
        tuple(src.classes),
        settings,
        train,
        mcfg,
        masks,
        seeds,
        d.protocol,
        d.shots,
        d.transfer_seed,
        spec.transfer.val_fraction,
        INFLUENCE_FRACTION,
        d.models_per_trial,
        name,
    )
