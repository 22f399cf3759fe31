"""Which finished results ``transferlab run --rerun-changed`` computes again: those another code
computed.

Every run is tagged with the code digest of trainers/ and datasets_/ that computed it
(:func:`orchestrator.records.provenance.code_digest`). A finished pretraining run of the plan
with another digest is computed again; so is a finished transfer fit with another digest, or
whose pretraining is computed again, or which was computed from another pretraining run than
the one that now stands for its pretraining job (after that job was computed again).

The old runs are kept: the new run of a job ends later, so it is the one that stands for the
job (:func:`~orchestrator.records.tracker.run_per_config`) and analysis counts the job once; the
driver then tags the old one ``transferlab.superseded_by`` (:func:`~orchestrator.records.tracker.superseded`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.planning.plan import StudyPlan
from orchestrator.records.schema import FINISHED, TAG_CODE_DIGEST, TAG_PARENT


@dataclass(frozen=True)
class Changed:
    """Config hashes of the plan's finished results that ``--rerun-changed`` computes again."""

    pretrain: frozenset[str] = field(default_factory=frozenset)
    transfer: frozenset[str] = field(default_factory=frozenset)


def is_finished(run) -> bool:
    """Whether ``run`` (an MLflow run, or None for none) is FINISHED."""
    return run is not None and run.info.status == FINISHED


def changed_results(plan: StudyPlan, pretrain: dict, transfer: dict, digest: str) -> Changed:
    """What of ``plan`` to compute again under code digest ``digest``, given the runs that stand
    for each job (config hash -> run, as :meth:`~orchestrator.records.tracker.Tracker.runs_by_hash`
    gives them). Pure: reads the runs' status and tags only."""
    pre = frozenset(
        r.config_hash
        for r in plan.pretrain_runs
        if is_finished(run := pretrain.get(r.config_hash)) and run.data.tags.get(TAG_CODE_DIGEST) != digest
    )
    fits = set()
    for g in plan.transfer_groups:
        parent = pretrain.get(g.pretrain_hash)
        for f in g.fits:
            run = transfer.get(f.config_hash)
            if not is_finished(run):
                continue
            if (
                run.data.tags.get(TAG_CODE_DIGEST) != digest
                or g.pretrain_hash in pre
                or (parent is not None and run.data.tags.get(TAG_PARENT) != parent.info.run_id)
            ):
                fits.add(f.config_hash)
    return Changed(pre, frozenset(fits))
