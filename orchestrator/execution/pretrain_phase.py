"""The pretraining phase: one Ray Tune trial per pretraining run, each a Tune *function* that
builds and fits a Ray Train ``TorchTrainer`` (Train V2 cannot be wrapped by a Tuner directly).
Runs that ``pretrain.pack`` packs train several per trial instead
(:mod:`orchestrator.execution.packed_phase`).

Metrics reach MLflow through :class:`~orchestrator.records.train_callback.MLflowReportCallback`
on the Train controller, into a run the driver created; the loop itself
(:func:`trainers.pretrain.pretrain_loop`) knows nothing of MLflow. The trial samples system
metrics into the run while it trains (:mod:`orchestrator.records.system_metrics`) and, once the
checkpoint is final, logs it as the run's MLflow logged model (:func:`log_checkpoint_model`).
"""

from __future__ import annotations

import sys
import time

from datasets_.objstore import is_remote
from datasets_.pipeline import ray_dataset
from orchestrator.execution.phase import NOT_LAUNCHED, PhaseContext, Progress, run_phase
from orchestrator.planning.estimate import pretrain_concurrency
from orchestrator.planning.pretrain_runs import PretrainRun
from orchestrator.records import retry, spool
from orchestrator.records.models import log_pretrained_model
from orchestrator.records.schema import FAILED, METRIC_TRIAL_SECONDS, TAG_CHECKPOINT, TAG_MODEL_ID
from orchestrator.records.system_metrics import system_metrics
from orchestrator.records.tracker import Tracker, flatten
from orchestrator.records.train_callback import MLflowReportCallback
from trainers.methods import clip_text_input
from trainers.pretrain import load_model, pretrain_loop


def train_run_name(run: PretrainRun, run_id: str) -> str:
    """The Ray Train run name of pretraining job ``run`` recorded in MLflow run ``run_id``: a
    second fit() with it resumes from its checkpoint. The MLflow run is part of the name, so
    another study on the same storage (or the same study after its run was deleted) trains into
    a folder of its own instead of "resuming" someone else's finished checkpoint."""
    return f"pretrain-{run.config_hash}-{run_id}"


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint lives, as a path or URI any process can open again.

    With ``storage_path`` on an object store, ``Checkpoint.path`` is the key inside the bucket
    (``bucket/prefix/...``) without its scheme; ``Checkpoint(uri)`` needs the scheme back.
    """
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    if kind == "local" or is_remote(checkpoint.path):
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{checkpoint.path}"


def log_checkpoint_model(
    tracker: Tracker, experiment_id: str, run_id: str, checkpoint: str, name: str, params: dict, epochs: int
) -> str | None:
    """Log the model of checkpoint ``checkpoint`` (path or URI) as the logged model of pretraining
    run ``run_id`` (named ``name``, with its ``params``, at its last epoch); returns its id.

    A model MLflow refuses is not a failed run: the run keeps its checkpoint, a warning says so,
    and the next ``transferlab run`` that fits transfer runs on it logs the model then
    (``None`` here). Only an outage past the study's deadline
    (:class:`~orchestrator.records.retry.TrackingUnavailable`) stops the trial, as any record does.
    """
    from ray.train import Checkpoint

    try:
        with Checkpoint(checkpoint).as_directory() as d:
            model = load_model(d)
        return log_pretrained_model(tracker.client, experiment_id, run_id, model, name, epochs - 1, flatten(params))
    except retry.TrackingUnavailable:
        raise
    except Exception as e:
        first = retry.redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        print(
            f"warning: the model of pretraining run '{name}' (run {run_id}) was not logged to MLflow ({first[:200]}); "
            f"its checkpoint stays at {checkpoint}, and the next `transferlab run` that needs it logs it",
            file=sys.stderr,
            flush=True,
        )
        return None


def run_model(tracker: Tracker, experiment_id: str, run, checkpoint: str) -> str | None:
    """The logged model of FINISHED pretraining run ``run`` (an MLflow run) with checkpoint
    ``checkpoint``: the one it is tagged with, else logged now (its trial could not log it, or it
    finished before transferlab logged models)."""
    params = run.data.params
    return run.data.tags.get(TAG_MODEL_ID) or log_checkpoint_model(
        tracker, experiment_id, run.info.run_id, checkpoint, run.info.run_name, params, int(params.get("epochs", 1))
    )


def build_pretrain_trainer(
    run: PretrainRun, ctx: PhaseContext, run_id: str, fault: dict | None = None, in_tune: bool = False
):
    """The Ray Train ``TorchTrainer`` of one pretraining run, reporting into MLflow run ``run_id``
    (and, ``in_tune``, to the Tune trial that fits it, for progress lines). ``fault`` is the
    loop's test hook (``PretrainConfig.fault``).

    Its run name is deterministic (:func:`train_run_name`), so fitting it again resumes from the
    last checkpoint; ``FailureConfig`` restarts failed workers from it within one fit.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = run.config if fault is None else run.config.replace(fault=fault)
    ds = ctx.open_data(f"sources.{run.source}")
    # Rows reach each worker in a fixed order (then a seeded local shuffle), so a run is
    # reproducible from its config rather than from how Ray scheduled the read tasks.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    callbacks = [MLflowReportCallback(ctx.tracking_uri, run_id, ctx.mlflow_env, ctx.storage_path, ctx.experiment_id)]
    if in_tune:
        callbacks.append(TuneReportCallback())
    text = clip_text_input(list(config.classes)) if config.method == "clip" else None
    r = ctx.resources
    return TorchTrainer(
        pretrain_loop,
        train_loop_config=config.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}
        ),
        datasets={
            "train": ray_dataset(ds, "train", config.image_size, view=run.view, text=text),
            # Upstream accuracy is measured on the classes the model was trained on.
            "heldout": ray_dataset(ds, "test", config.image_size, view=run.heldout_view()),
        },
        dataset_config=ray.train.DataConfig(execution_options=ingest),
        run_config=ray.train.RunConfig(
            name=train_run_name(run, run_id),
            storage_path=ctx.storage_path,
            # MLflow records for the study; Tune sees each report too (progress lines).
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
        ),
    )


def _pretrain_trial(config: dict, ctx: PhaseContext) -> dict:
    if not ctx.begin_trial():
        return {NOT_LAUNCHED: 1}
    t0 = time.monotonic()
    run = ctx.pretrain_runs[config["run"]]
    run_id = ctx.run_ids[run.config_hash]
    tracker = ctx.tracker()
    try:
        with system_metrics([run_id], ctx.tracking_uri):
            result = build_pretrain_trainer(run, ctx, run_id, in_tune=True).fit()
        metrics = result.metrics or {}
        spool.flush(
            ctx.storage_path, spool.scope(ctx.tracking_uri, ctx.experiment_id), tracker.client, run_id
        )  # reports the server missed
        tracker.log(
            run_id,
            metrics={
                "realized_label_noise": run.realized_label_noise,
                "num_train_samples": run.num_train_samples,
                METRIC_TRIAL_SECONDS: time.monotonic() - t0,
            },
            tags={TAG_CHECKPOINT: checkpoint_uri(result.checkpoint)},
        )
        uri = checkpoint_uri(result.checkpoint)
        log_checkpoint_model(tracker, ctx.experiment_id, run_id, uri, run.run_name, run.params, run.config.epochs)
        tracker.finish(run_id)
        return {
            "upstream_accuracy": metrics.get("upstream_accuracy", float("nan")),
            "train_loss": metrics.get("train_loss"),
        }
    except BaseException:
        try:
            tracker.finish(run_id, FAILED)
        except retry.TrackingUnavailable:
            pass  # the run stays RUNNING in MLflow; the next `transferlab run` resumes it
        raise


def describe_epoch(result: dict) -> str | None:
    if "epoch" not in result or "train_loss" not in result:
        return None
    rate = result.get("images_per_second", 0)
    return f"epoch {int(result['epoch']) + 1}: train_loss={result['train_loss']:.4f} ({rate:.0f} img/s)"


def run_pretrain_phase(ctx: PhaseContext, runs: list[PretrainRun], cluster_cpus: float, on_counts=None) -> Progress:
    items = {r.config_hash: r.run_name for r in runs}
    # The trial only drives a TorchTrainer whose workers are scheduled on their own.
    return run_phase(
        "pretrain",
        _pretrain_trial,
        "run",
        items,
        ctx,
        0.01,
        pretrain_concurrency(ctx.resources, cluster_cpus),
        lambda r: f"upstream_accuracy={r.get('upstream_accuracy', float('nan')):.3f}",
        describe_epoch,
        on_counts,
    )
