"""The transfer phase: plain Ray Tune function trials, one per (pretraining checkpoint, task),
each extracting features once per layer (or reading them from the feature cache) and running
every protocol × shots × seed fit from them, so light work never pays a trainer's start-up."""

from __future__ import annotations

import tempfile
import time

from orchestrator.execution.phase import NOT_LAUNCHED, PhaseContext, Progress, cluster_gpus, run_phase
from orchestrator.planning.estimate import transfer_concurrency
from orchestrator.planning.transfer_fits import TransferFit, TransferGroup
from orchestrator.records.retry import redact
from orchestrator.records.schema import KIND_TRANSFER, METRIC_TRIAL_SECONDS, PER_EXAMPLE_ARTIFACT
from orchestrator.records.tracker import Tracker
from trainers.devices import trial_device
from trainers.features import FeatureCache
from trainers.transfer import Fit, evaluate_transfer


def feature_cache(storage_path: str):
    """The study storage's feature cache (shared by every study on that storage)."""
    return FeatureCache(f"{storage_path.rstrip('/')}/feature_cache")


def trainer_fit(fit: TransferFit):
    """The transfer trainer's description of a planned fit."""
    return Fit(fit.protocol, fit.shots, fit.seed, fit.layer)


def record_fit(
    tracker: Tracker,
    ctx: PhaseContext,
    group: TransferGroup,
    fit: TransferFit,
    result,
    metrics: dict,
    artifacts: dict[str, object] | None = None,
) -> str:
    """Record one finished transfer fit: its run (created, or the one an earlier attempt left),
    params, the result's metrics and ``metrics``, the per-example outputs, ``artifacts`` (artifact
    path -> JSON-able object); then FINISHED. Returns the run id."""
    run_id = ctx.run_ids.get(fit.config_hash)
    if run_id is None:
        run_id = tracker.create_run(
            ctx.experiment_id,
            KIND_TRANSFER,
            ctx.study,
            fit.run_name,
            fit.config_hash,
            group.params(fit),
            parent_run_id=ctx.run_ids[group.pretrain_hash],
        )
    else:
        tracker.reopen(run_id)
        tracker.log(run_id, params=group.params(fit))
    tracker.log(run_id, metrics={**result.metrics, **metrics})
    uri, fingerprint = ctx.datasets[f"tasks.{group.task}"]
    model = ctx.models.get(group.pretrain_hash)  # the checkpoint's logged model: the UI links the two
    tracker.log_inputs(run_id, [(group.task, fingerprint, redact(uri), "transfer")], [model] if model else ())
    folder, name = PER_EXAMPLE_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as d:
        result.outputs.to_parquet(f"{d}/{name}", index=False)
        tracker.client.log_artifact(run_id, f"{d}/{name}", folder)
    for path, obj in (artifacts or {}).items():
        tracker.client.log_dict(run_id, obj, path)
    tracker.finish(run_id)
    return run_id


def _transfer_trial(config: dict, ctx: PhaseContext) -> dict:
    from ray.train import Checkpoint

    if not ctx.begin_trial():
        return {NOT_LAUNCHED: 1}
    t0 = time.monotonic()
    group = ctx.transfer_groups[config["group"]]
    tracker = ctx.tracker()
    task = ctx.open_data(f"tasks.{group.task}")
    with Checkpoint(ctx.checkpoints[group.pretrain_hash]).as_directory() as ckpt_dir:
        results, stats = evaluate_transfer(
            ckpt_dir,
            task,
            [trainer_fit(f) for f in group.fits],
            group.config,
            feature_cache(ctx.storage_path),
            trial_device(ctx.resources.use_gpu),
        )
    # The trial's time so far (the fits' share of logging is small), the same on every fit.
    seconds = time.monotonic() - t0
    for fit, r in zip(group.fits, results):
        record_fit(tracker, ctx, group, fit, r, {METRIC_TRIAL_SECONDS: seconds})
    return {
        "fits": len(results),
        "mean_accuracy": sum(r.metrics["accuracy"] for r in results) / max(len(results), 1),
        "feature_extractions": stats.feature_extractions,
        "feature_cache_hits": stats.feature_cache_hits,
    }


def run_transfer_phase(ctx: PhaseContext, labels: dict[str, str], cluster_cpus: float, on_counts=None) -> Progress:
    return run_phase(
        "transfer",
        _transfer_trial,
        "group",
        labels,
        ctx,
        ctx.resources.light_trial(),
        transfer_concurrency(cluster_cpus, ctx.resources, cluster_gpus()),
        lambda r: (
            f"{r.get('fits', 0)} fits, mean accuracy {r.get('mean_accuracy', float('nan')):.3f}, "
            f"features: {r.get('feature_extractions', 0)} extracted, {r.get('feature_cache_hits', 0)} from cache"
        ),
        on_counts=on_counts,
    )
