"""From a validated spec to a :class:`StudyPlan`: data pre-flight, the pretraining runs, their
transfer fits (or a datamodel sweep), each with the content hash that recognizes its result in
MLflow (:mod:`orchestrator.planning.hashing`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets_ import ShardedDataset
from orchestrator.planning.data_checks import check_data, check_overlap, resolve_data
from orchestrator.planning.datamodel_plan import DatamodelPlan, build_datamodel_plan
from orchestrator.planning.hashing import content_hash
from orchestrator.planning.pretrain_runs import PretrainRun, pretrain_runs
from orchestrator.planning.transfer_fits import TransferGroup, transfer_groups
from orchestrator.spec import StudySpec
from trainers.protocols import FULL


@dataclass
class StudyPlan:
    spec: StudySpec
    data: dict[str, ShardedDataset]
    pretrain_runs: list[PretrainRun]
    transfer_groups: list[TransferGroup] = field(default_factory=list)
    datamodels: DatamodelPlan | None = None  # a datamodels study's sweep, instead of the runs above

    @property
    def num_transfer_fits(self) -> int:
        return sum(len(g.fits) for g in self.transfer_groups)

    @property
    def spec_hash(self) -> str:
        return content_hash(self.spec.raw)


def build_plan(spec: StudySpec, data: dict[str, ShardedDataset] | None = None) -> StudyPlan:
    """Pre-flight the data and expand the pretraining grid and the transfer fits."""
    data = data if data is not None else resolve_data(spec)
    # A datamodels study probes at datamodels.shots (checked with its plan), not transfer.shots.
    check_data(spec, data, shots=(FULL,) if spec.datamodels is not None else ())
    if spec.preflight_overlap != "off":
        check_overlap(spec, data)
    if spec.datamodels is not None:  # a datamodel sweep replaces the pretraining grid
        return StudyPlan(spec=spec, data=data, pretrain_runs=[], datamodels=build_datamodel_plan(spec, data))
    runs = pretrain_runs(spec, data)
    return StudyPlan(spec=spec, data=data, pretrain_runs=runs, transfer_groups=transfer_groups(spec, runs, data))
