"""Influence inputs from a datamodel sweep's table (:mod:`orchestrator.records.datamodel_table`).

A datamodels study has no pretrain/transfer runs: its ``datamodels`` run names the table (tag
``transferlab.datamodel_table``), one row per trained model with its class mask and its outputs
on every example of the task's influence holdout (``split``: which examples; a table written
before the holdout has its outputs on the test split). This turns that table into the same
:class:`InfluenceInputs` the class-subset runs give, so the report's influence section and
``transferlab counterfactual`` read both alike.
"""

from __future__ import annotations

import numpy as np

from orchestrator.analysis.frame import InfluenceInputs
from orchestrator.records.datamodel_table import read_examples, read_sweep, read_table
from orchestrator.records.schema import KIND_DATAMODELS, OUTPUTS_TEST, PARAM_OUTPUTS_SPLIT, TAG_DATAMODEL_TABLE
from orchestrator.records.tracker import Tracker
from orchestrator.spec import StudySpec


def influence_output(spec: StudySpec | None) -> str:
    """The per-example output a study's datamodel influence is read from: its
    ``datamodels.influence_on``; correct_prob for a study without datamodels (or no logged spec)."""
    return spec.datamodels.influence_on if spec is not None and spec.datamodels is not None else "correct_prob"


def datamodel_inputs(tracker: Tracker, experiment_id: str, column: str = "correct_prob") -> list[InfluenceInputs]:
    """One InfluenceInputs per datamodel sweep of the study that has finished models (any run status:
    a sweep still running gives its finished models; the report flags it partial). ``column``: the
    per-example output read (``datamodels.influence_on``: margin | correct_prob; every table
    records both), named in each input's ``output``."""
    out = []
    for run in sorted(tracker.runs(experiment_id, KIND_DATAMODELS), key=lambda r: r.info.start_time or 0):
        uri = run.data.tags.get(TAG_DATAMODEL_TABLE)
        sweep = read_sweep(uri) if uri else None
        table = read_table(uri, ["model", "mask", column]) if sweep else None
        if table is None or table.num_rows < 2:
            continue
        masks = np.array(table.column("mask").to_pylist(), dtype=bool)
        outputs = np.array(table.column(column).to_pylist(), dtype=float)
        ex = read_examples(uri)
        examples = ex.column("example").to_numpy() if ex is not None else np.arange(outputs.shape[1])
        out.append(
            InfluenceInputs(
                sweep["task"],
                sweep["protocol"],
                sweep["source"],
                str(sweep["shots"]),
                list(sweep["classes"]),
                masks,
                outputs,
                examples,
                sweep.get(PARAM_OUTPUTS_SPLIT, OUTPUTS_TEST),  # older tables scored the test split
                column,
            )
        )
    return out
