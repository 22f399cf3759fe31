"""Packed pretraining trials: several small pretraining runs trained at once in one plain Ray
Tune function trial (:mod:`trainers.packed`), without a TorchTrainer per run.

Which runs share a trial is the plan's (:mod:`orchestrator.planning.packs`). A trial decodes its
source's training and held-out splits once (the rows its runs' views keep, :func:`decode_kept`), trains its
runs stacked on its device (its share of a GPU with ``resources.use_gpu``, as a datamodel
trial), and records every run as a TorchTrainer run would be recorded: its own MLflow run with
per-epoch ``train_loss`` and ``images_per_second`` (step = epoch, through the same
:class:`~orchestrator.records.train_callback.MLflowReportCallback`, so reports the server misses
wait in the storage spool), ``upstream_accuracy`` at the last epoch, ``realized_label_noise``,
``num_train_samples``, ``trial_seconds`` (the pack's seconds divided by its runs), ``pack_size``,
and a checkpoint in the usual format (:func:`trainers.pretrain.save_checkpoint`) under the
storage path, in the folder :func:`~orchestrator.execution.pretrain_phase.train_run_name` names,
tagged ``TAG_CHECKPOINT`` and logged as the run's MLflow logged model
(:func:`~orchestrator.execution.pretrain_phase.log_checkpoint_model`). The trial's system metrics
(:mod:`orchestrator.records.system_metrics`) go to every run of its pack: they shared the process.

A run is FINISHED only after its checkpoint is written. A pack that fails marks its unfinished
runs FAILED; the next ``transferlab run`` retrains those from scratch in a new pack (runs already
FINISHED are never retrained). Training is deterministic, so a retrained run logs the same
epoch metrics an interrupted attempt may already have logged (those steps are not logged twice).
"""

from __future__ import annotations

import os
import tempfile
import time

from datasets_.objstore import write_atomic
from datasets_.pipeline import decode_rows
from orchestrator.execution.phase import NOT_LAUNCHED, PhaseContext, Progress, cluster_gpus, run_phase
from orchestrator.execution.pretrain_phase import describe_epoch, log_checkpoint_model, train_run_name
from orchestrator.planning.estimate import pack_concurrency
from orchestrator.planning.packs import Pack, plan_packs
from orchestrator.records import retry, spool
from orchestrator.records.schema import FAILED, METRIC_PACK_SIZE, METRIC_TRIAL_SECONDS, TAG_CHECKPOINT
from orchestrator.records.system_metrics import system_metrics
from orchestrator.records.train_callback import MLflowReportCallback
from trainers.devices import trial_device
from trainers.packed import DecodedSplit, PackedResult, train_packed
from trainers.pretrain import CHECKPOINT_FILE, save_checkpoint

PACKED_CHECKPOINT_DIR = "checkpoint_packed"


def write_packed_checkpoint(storage_path: str, name: str, result: PackedResult, epoch: int) -> str:
    """Write a packed run's checkpoint under ``storage_path/name`` (local or object store, whole
    or not at all); returns the checkpoint folder's path or URI, as ``TAG_CHECKPOINT`` holds it."""
    folder = f"{storage_path.rstrip('/')}/{name}/{PACKED_CHECKPOINT_DIR}"
    with tempfile.TemporaryDirectory() as d:
        with open(save_checkpoint(d, result.model, result.meta, epoch=epoch), "rb") as f:
            body = f.read()
    write_atomic(f"{folder}/{CHECKPOINT_FILE}", lambda out: out.write(body))
    return folder if "://" in folder else os.path.abspath(folder)


def decode_kept(ds, split: str, image_size: int, views: list, captions: bool = False) -> DecodedSplit:
    """The samples of ``split`` that at least one of ``views`` keeps (None keeps all), decoded
    (with their captions if ``captions``: clip's text): a view selects per sample (key hash,
    class), so a run's rows among them are its rows of the whole split, and a pack of small
    subsets decodes only those."""
    import numpy as np

    s = ds.keys_and_labels(split)
    keep = np.zeros(len(s.keys), dtype=bool)
    for v in views:
        keep |= True if v is None else v.apply(list(s.keys), s.labels)[0]
    rows = np.flatnonzero(keep)
    images = decode_rows(ds, split, image_size, rows)
    text = None
    if captions:
        column = ds.read_split(split, ("caption",)).column("caption").to_pylist()
        text = [column[i] for i in rows]
    return DecodedSplit(images, s.labels[rows], np.asarray(s.keys[rows], dtype=str), text)


def _splits(ctx: PhaseContext, runs: list) -> tuple[DecodedSplit, DecodedSplit]:
    ds = ctx.open_data(f"sources.{runs[0].source}")
    size = runs[0].config.image_size
    return (
        decode_kept(ds, "train", size, [r.view for r in runs], captions=runs[0].config.method == "clip"),
        decode_kept(ds, "test", size, [r.heldout_view() for r in runs]),
    )


def _record(ctx: PhaseContext, tracker, run, run_id: str, cb, result: PackedResult, seconds: float, n: int) -> None:
    """Everything of one packed run after training, then FINISHED."""
    last = run.config.epochs - 1
    cb.after_report(None, [{"epoch": last, "upstream_accuracy": result.upstream_accuracy}], None)
    uri = write_packed_checkpoint(ctx.storage_path, train_run_name(run, run_id), result, last)
    spool.flush(ctx.storage_path, spool.scope(ctx.tracking_uri, ctx.experiment_id), tracker.client, run_id)
    tracker.log(
        run_id,
        metrics={
            "realized_label_noise": run.realized_label_noise,
            "num_train_samples": run.num_train_samples,
            METRIC_TRIAL_SECONDS: seconds,
            METRIC_PACK_SIZE: n,
        },
        tags={TAG_CHECKPOINT: uri},
    )
    log_checkpoint_model(tracker, ctx.experiment_id, run_id, uri, run.run_name, run.params, run.config.epochs)
    tracker.finish(run_id)


def _packed_trial(config: dict, ctx: PhaseContext) -> None:
    import torch
    from ray import tune

    if not ctx.begin_trial():
        tune.report({NOT_LAUNCHED: 1})
        return
    t0 = time.monotonic()
    runs = [ctx.pretrain_runs[h] for h in ctx.packs[config["pack"]]]
    run_ids = [ctx.run_ids[r.config_hash] for r in runs]
    tracker, finished = ctx.tracker(), set()
    r = ctx.resources
    torch.set_num_threads(max(1, int(r.cpus_per_worker)))
    callbacks = [
        MLflowReportCallback(ctx.tracking_uri, rid, ctx.mlflow_env, ctx.storage_path, ctx.experiment_id)
        for rid in run_ids
    ]
    longest = max(range(len(runs)), key=lambda b: runs[b].config.epochs)

    def on_epoch(b: int, metrics: dict) -> None:
        callbacks[b].after_report(None, [metrics], None)
        if b == longest:  # the phase's progress line follows the pack's longest run
            tune.report(metrics)

    try:
        with system_metrics(run_ids, ctx.tracking_uri):
            train, held = _splits(ctx, runs)
            results = train_packed(
                [x.config for x in runs],
                [x.view for x in runs],
                [x.heldout_view() for x in runs],
                train,
                held,
                trial_device(r.use_gpu),
                on_epoch,
            )
        seconds = (time.monotonic() - t0) / len(runs)
        for run, rid, cb, result in zip(runs, run_ids, callbacks, results):
            _record(ctx, tracker, run, rid, cb, result, seconds, len(runs))
            finished.add(rid)
        accuracy = sum(x.upstream_accuracy for x in results) / len(results)
        tune.report({"upstream_accuracy": accuracy, "models": len(runs)})
    except BaseException:
        for rid in run_ids:
            if rid not in finished:
                try:
                    tracker.finish(rid, FAILED)
                except retry.TrackingUnavailable:
                    pass  # the run stays RUNNING in MLflow; the next `transferlab run` resumes it
        raise


def split_packs(ctx: PhaseContext, spec, todo: list, cluster_cpus: float) -> tuple[list[Pack], list]:
    """(packs, runs with their own TorchTrainer) of a study's pending pretraining runs
    (:func:`orchestrator.planning.packs.plan_packs`, with each source's size as the trial opens it)."""
    r = spec.resources
    samples = {s: ctx.open_data(f"sources.{s}").num_samples("train") for s in {x.source for x in todo}}
    return plan_packs(todo, spec.pretrain.pack, r.workers, samples, pack_concurrency(r, cluster_cpus))


def run_packed_phase(ctx: PhaseContext, packs: list[Pack], cluster_cpus: float, on_counts=None) -> Progress:
    """One Tune trial per pack, each holding ``resources.cpus_per_worker`` CPUs (and its GPU
    share with ``use_gpu``)."""
    r = ctx.resources
    ctx.packs = {p.key: tuple(x.config_hash for x in p.runs) for p in packs}
    cluster = {"CPU": cluster_cpus, "GPU": cluster_gpus()}
    return run_phase(
        "pretrain-packed",
        _packed_trial,
        "pack",
        {p.key: p.label for p in packs},
        ctx,
        r.light_trial(r.cpus_per_worker),
        r.max_concurrent_trials or r.light_concurrency(cluster, r.cpus_per_worker),
        lambda x: f"{x.get('models', 0)} runs, mean upstream_accuracy={x.get('upstream_accuracy', float('nan')):.3f}",
        describe_epoch,
        on_counts,
    )
