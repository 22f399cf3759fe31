"""Running a datamodel sweep (Jain et al. 2022): many small models on random class subsets of a
source, ``models_per_trial`` at a time.

Models run in plain Ray Tune function trials, stacked with ``torch.func``
(:mod:`trainers.stacked`): no TorchTrainer per model, whose ~12 s start-up would dominate a model
that trains in a second. Which model trains on which classes is the plan's
(:mod:`orchestrator.planning.datamodel_plan`).

Results go to one columnar table (:mod:`orchestrator.records.datamodel_table`): each finished
trial writes one Parquet part atomically, so a rerun skips every model a part holds. MLflow gets
one ``datamodels`` run for the sweep and one ``datamodel_batch`` run per finished trial, not one
run per model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa

from datasets_ import ShardedDataset
from datasets_.objstore import is_remote
from datasets_.pipeline import decode_split
from datasets_.views import influence_holdout
from orchestrator.execution.phase import NOT_LAUNCHED, TrialContext, cluster_gpus, run_phase
from orchestrator.planning.datamodel_plan import DatamodelPlan
from orchestrator.records.datamodel_table import TABLE_SCHEMA, finished_models, table_uri, write_header, write_part
from orchestrator.records.retry import redact
from orchestrator.records.schema import (
    DATAMODEL_PART_ARTIFACT_DIR,
    FAILED,
    FINISHED,
    KILLED,
    KIND_DATAMODEL_BATCH,
    KIND_DATAMODELS,
    OUTPUTS_INFLUENCE_HOLDOUT,
    PARAM_OUTPUTS_SPLIT,
    TAG_DATAMODEL_TABLE,
)
from orchestrator.records.tracker import Tracker
from orchestrator.spec import StudySpec
from trainers.devices import trial_device
from trainers.features import Features
from trainers.stacked import probe_outputs, stacked_features, stacked_upstream_accuracy, train_stacked


def write_sweep_header(table: str, plan: DatamodelPlan, task: ShardedDataset) -> None:
    """The table's ``sweep.json`` and ``examples.parquet`` (the task's influence holdout: its
    position in the train split, key and label)."""

    def examples() -> pa.Table:
        train = task.keys_and_labels("train")
        held = np.flatnonzero(influence_holdout(train.keys, plan.influence_fraction))
        return pa.table(
            {
                "example": held.astype(np.int64),
                "key": train.keys[held].astype(str),
                "label": train.labels[held].astype(np.int64),
            }
        )

    sweep = {
        "config_hash": plan.config_hash,
        "source": plan.source,
        "task": plan.task,
        "classes": list(plan.classes),
        "protocol": plan.protocol,
        "shots": plan.shots,
        "settings": asdict(plan.settings),
        "model_config": plan.model_config,
        PARAM_OUTPUTS_SPLIT: OUTPUTS_INFLUENCE_HOLDOUT,
        "influence_fraction": plan.influence_fraction,
    }
    write_header(table, sweep, examples)


@dataclass(kw_only=True)
class DatamodelContext(TrialContext):
    """What every trial of a datamodel sweep needs."""

    sweep_run_id: str
    table: str
    plan: DatamodelPlan
    cpus_per_trial: float
    use_gpu: bool = False  # each trial holds a share of a GPU (resources.light_trial_gpus) and trains there
    trials: dict[str, tuple[int, ...]] = field(default_factory=dict)  # trial key -> model indices


def train_and_probe(
    plan: DatamodelPlan, source: ShardedDataset, task: ShardedDataset, models: tuple[int, ...], device=None
) -> pa.Table:
    """Train the given models of the sweep at once on ``device`` (default CPU) on ``source``,
    probe each on ``task``: their table rows, with each model's upstream accuracy (top-1 on the
    source's test split of its own classes). Each probe trains and selects on the task's train
    split less the influence holdout and is scored on the holdout; the test split is not read."""
    ts = plan.train
    images, labels, keys = decode_split(source, "train", ts.image_size)
    idx = list(models)
    sm = train_stacked(
        plan.model_config,
        len(plan.classes),
        images,
        labels,
        keys,
        plan.masks[idx],
        [plan.seeds[i] for i in idx],
        ts,
        device,
    )
    # upstream accuracy: each model on the held-out source split of its own classes
    heldout_x, heldout_y, _ = decode_split(source, "test", ts.image_size)
    upstream = stacked_upstream_accuracy(sm, heldout_x, heldout_y, plan.masks[idx])
    x, y, k = decode_split(task, "train", ts.image_size)
    held = influence_holdout(k, plan.influence_fraction)
    feats = stacked_features(sm, x)  # [models × examples × dim]
    rows = []
    for j, i in enumerate(idx):
        acc, out = probe_outputs(
            Features(k[~held], feats[j][~held], y[~held]),
            Features(k[held], feats[j][held], y[held]),
            task.num_classes,
            plan.protocol,
            plan.shots,
            plan.transfer_seed,
            plan.val_fraction,
        )
        rows.append(
            {
                "model": i,
                "seed": plan.seeds[i],
                "mask": plan.masks[i].tolist(),
                "num_train_samples": int(sm.num_train_samples[j]),
                "train_loss": float(sm.train_loss[j]),
                "accuracy": acc,
                "correct_prob": out["correct_prob"].to_numpy(np.float32),
                "margin": out["margin"].to_numpy(np.float32),
                "prediction": out["prediction"].to_numpy(np.int32),
                "upstream_accuracy": float(upstream[j]),
            }
        )
    return pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)


def _datamodel_trial(config: dict, ctx: DatamodelContext) -> dict:
    import torch

    if not ctx.begin_trial():  # budget.max_hours: the table keeps what finished; a rerun goes on
        return {NOT_LAUNCHED: 1}
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    models = ctx.trials[config["trial"]]
    t0 = time.monotonic()
    source, task = ctx.open_data(f"sources.{ctx.plan.source}"), ctx.open_data(f"tasks.{ctx.plan.task}")
    table = train_and_probe(ctx.plan, source, task, models, trial_device(ctx.use_gpu))
    path = write_part(ctx.table, models, table)
    seconds = time.monotonic() - t0
    mean_acc = float(np.mean(table.column("accuracy").to_numpy()))
    upstream = table.column("upstream_accuracy").to_numpy(zero_copy_only=False)
    tracker = ctx.tracker()
    name = f"models {min(models)}-{max(models)}"
    run_id = tracker.create_run(
        ctx.experiment_id,
        KIND_DATAMODEL_BATCH,
        ctx.study,
        name,
        f"{ctx.plan.config_hash}:{config['trial']}",
        {"first_model": min(models), "last_model": max(models), "models": len(models)},
        parent_run_id=ctx.sweep_run_id,
    )
    tracker.log(
        run_id,
        metrics={
            "models": len(models),
            "seconds": seconds,
            "models_per_hour": 3600 * len(models) / seconds,
            "mean_accuracy": mean_acc,
            "mean_upstream_accuracy": float(np.nanmean(upstream)),
            "min_upstream_accuracy": float(np.nanmin(upstream)),
        },
    )
    if not is_remote(ctx.table):
        tracker.client.log_artifact(run_id, path, DATAMODEL_PART_ARTIFACT_DIR)
    tracker.finish(run_id)
    return {"models": len(models), "mean_accuracy": mean_acc, "seconds": seconds}


def _memory_line(plan: DatamodelPlan, source: ShardedDataset) -> str:
    """Each trial holds the source's training split decoded (uint8) in memory, for the stacked
    models' random access: say how much, so a source too large for a node is seen up front."""
    n = source.num_samples("train")
    side = plan.train.image_size
    mib = n * 3 * side * side / 2**20
    return f"each trial decodes the source's {n:,} training images at {side}px into {mib:,.0f} MiB of memory"


def trial_batches(todo: list[int], per_trial: int) -> dict[str, tuple[int, ...]]:
    """Model indices still to do, cut into trials of ``per_trial`` (key: first-last index)."""
    out = {}
    for i in range(0, len(todo), per_trial):
        chunk = tuple(todo[i : i + per_trial])
        out[f"{chunk[0]:06d}-{chunk[-1]:06d}"] = chunk
    return out


@dataclass
class DatamodelOutcome:
    total: int
    done_before: int
    ran: int
    done: int
    failed: list[str]
    table: str
    not_launched: int = 0  # trials skipped past budget.max_hours

    def summary(self) -> str:
        return (
            f"datamodels: {self.done}/{self.total} models in the table {self.table} "
            f"({self.ran} trained now, {self.done_before} already there)"
        )


def _sweep_run(tracker: Tracker, exp: str, spec: StudySpec, plan: DatamodelPlan, study_run: str, table: str) -> str:
    prior = tracker.runs_by_hash(exp, KIND_DATAMODELS).get(plan.config_hash)
    if prior is not None:
        tracker.reopen(prior.info.run_id)
        return prior.info.run_id
    return tracker.create_run(
        exp,
        KIND_DATAMODELS,
        spec.study,
        plan.run_name,
        plan.config_hash,
        plan.params(spec),
        parent_run_id=study_run,
        tags={TAG_DATAMODEL_TABLE: table},
    )


def run_datamodels(
    spec: StudySpec, plan: DatamodelPlan, tracker: Tracker, study_run: str, study: TrialContext, cpus: float
) -> DatamodelOutcome:
    """Train every model of the sweep the table lacks; record the sweep and its trials in MLflow.
    ``study`` is what every trial of the study shares (tracking, storage, data, budget)."""
    table = table_uri(study.storage_path, spec.study, plan.config_hash)
    write_sweep_header(table, plan, study.open_data(f"tasks.{plan.task}"))
    run_id = _sweep_run(tracker, study.experiment_id, spec, plan, study_run, table)
    done = finished_models(table)
    todo = [i for i in range(plan.num_models) if i not in done]
    done_before = plan.num_models - len(todo)
    print(
        f"datamodels: {plan.num_models} models ({done_before} already in the table), {plan.models_per_trial} per "
        "trial; "
        f"{_memory_line(plan, study.open_data(f'sources.{plan.source}'))}\ntable: {redact(table)}",
        flush=True,
    )
    r = spec.resources
    shared = {f.name: getattr(study, f.name) for f in fields(TrialContext)}
    ctx = DatamodelContext(
        **shared,
        sweep_run_id=run_id,
        table=table,
        plan=plan,
        cpus_per_trial=r.cpus_per_worker,
        use_gpu=r.use_gpu,
        trials=trial_batches(todo, plan.models_per_trial),
    )
    failed: list[str] = []
    not_launched = 0
    status = FAILED
    try:
        if ctx.trials:
            cluster = {"CPU": cpus, "GPU": cluster_gpus()}
            concurrency = r.max_concurrent_trials or r.light_concurrency(cluster, r.cpus_per_worker)
            labels = {k: f"models {v[0]}..{v[-1]} ({len(v)})" for k, v in ctx.trials.items()}
            progress = run_phase(
                "datamodels",
                _datamodel_trial,
                "trial",
                labels,
                ctx,
                r.light_trial(r.cpus_per_worker),
                concurrency,
                lambda x: (
                    f"{x.get('models', 0)} models in {x.get('seconds', 0):.1f}s, "
                    f"mean accuracy {x.get('mean_accuracy', float('nan')):.3f}"
                ),
            )
            failed = progress.errors
            not_launched = progress.not_launched
        now = finished_models(table)
        status = (
            FINISHED
            if len(now & set(range(plan.num_models))) == plan.num_models
            else KILLED
            if not_launched and not failed
            else FAILED
        )
    finally:
        n_done = len(finished_models(table) & set(range(plan.num_models)))
        step = len(tracker.client.get_metric_history(run_id, "models_done"))
        tracker.log(
            run_id,
            metrics={"models_done": n_done, "models_total": plan.num_models, "failed_trials": len(failed)},
            step=step,
        )
        tracker.finish(run_id, status)
    return DatamodelOutcome(plan.num_models, done_before, n_done - done_before, n_done, failed, table, not_launched)
