"""Ray Tune phases of a study: pretraining trials, then transfer trials.

Each pretraining trial is a Tune *function* that builds and fits a Ray Train ``TorchTrainer``
(Train V2 cannot be wrapped by a Tuner directly). Metrics reach MLflow through
:class:`~orchestrator.tracking.MLflowReportCallback` on the Train controller, into a run the
driver created. Transfer trials are plain Tune functions: one per (checkpoint, task), extracting
features once per layer (or reading them from the feature cache) and running every protocol ×
shots × seed fit from them, so light work never pays a trainer's start-up.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from datasets_.views import PretrainView
from orchestrator import retry, spool
from orchestrator.cluster import apply_mlflow_client_env
from orchestrator.plan import PretrainJob, TransferFit, TransferGroup
from orchestrator.spec import Resources
from orchestrator.tracking import (
    FAILED,
    KIND_TRANSFER,
    METRIC_TRIAL_SECONDS,
    PER_EXAMPLE_ARTIFACT,
    TAG_CHECKPOINT,
    MLflowReportCallback,
    Tracker,
)

# What a trial returns when it started after the study's budget.max_hours deadline: it did
# nothing, and the study counts it as not launched.
NOT_LAUNCHED = "not_launched"


@dataclass
class PhaseContext:
    """What every trial of a phase needs, shipped once through the object store."""

    study: str
    tracking_uri: str
    experiment_id: str
    storage_path: str
    resources: Resources
    pretrain_jobs: dict[str, PretrainJob] = field(default_factory=dict)
    transfer_groups: dict[str, TransferGroup] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)  # config_hash -> MLflow run id to use
    checkpoints: dict[str, str] = field(default_factory=dict)  # pretrain hash -> checkpoint dir
    # fit hash -> (its group, the fit) of fine-tuning fits tuned by a search (orchestrator.search)
    searches: dict[str, tuple[TransferGroup, TransferFit]] = field(default_factory=dict)
    # MLflow credentials/TLS settings of the driver (orchestrator.cluster.MLFLOW_CLIENT_ENV);
    # secrets, so kept out of the repr (and out of Tune's param_space, which is saved to disk).
    mlflow_env: dict[str, str] = field(default_factory=dict, repr=False)
    # Wall-clock time (time.time()) after which no trial starts work (budget.max_hours).
    deadline: float | None = None
    fail_fast: bool = False  # stop the phase at its first failed trial

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def train_run_name(job: PretrainJob) -> str:
    """Deterministic Ray Train run name: a second fit() with it resumes from its checkpoint."""
    return f"pretrain-{job.config_hash}"


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint lives, as a path or URI any process can open again.

    With ``storage_path`` on an object store, ``Checkpoint.path`` is the key inside the bucket
    (``bucket/prefix/...``) without its scheme; ``Checkpoint(uri)`` needs the scheme back.
    """
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    if kind == "local" or "://" in checkpoint.path:
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{checkpoint.path}"


def build_pretrain_trainer(job: PretrainJob, ctx: PhaseContext, run_id: str, extra_config: dict | None = None, in_tune: bool = False):
    """The Ray Train ``TorchTrainer`` of one pretraining job, reporting into MLflow run ``run_id``
    (and, ``in_tune``, to the Tune trial that fits it, for progress lines).

    Its run name is deterministic (:func:`train_run_name`), so fitting it again resumes from the
    last checkpoint; ``FailureConfig`` restarts failed workers from it within one fit.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from datasets_ import open_dataset
    from datasets_.pipeline import ray_dataset
    from trainers.pretrain import pretrain_loop

    s = job.settings
    ds = open_dataset(job.source_root)
    # Rows reach each worker in a fixed order (then a seeded local shuffle), so a run is
    # reproducible from its config rather than from how Ray scheduled the read tasks.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    callbacks = [MLflowReportCallback(ctx.tracking_uri, run_id, ctx.mlflow_env, ctx.storage_path)]
    if in_tune:
        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        pretrain_loop,
        train_loop_config={
            "method": s["method"],
            "model_config": job.model_config,
            "num_classes": job.num_classes,
            "classes": ds.classes,
            "image_size": s["image_size"],
            "epochs": s["epochs"],
            "batch_size": s["batch_size"],
            "lr": s["lr"],
            "weight_decay": s["weight_decay"],
            "lr_schedule": s["lr_schedule"],
            "warmup_epochs": s["warmup_epochs"],
            "amp": s["amp"],
            "seed": job.view.seed,
            "caption_noise": job.view.caption_noise,
            "num_train_samples": job.num_train_samples,
            "meta": {"config_hash": job.config_hash, "source": job.source, "classes": ds.classes},
            **(extra_config or {}),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.resources.workers,
            use_gpu=ctx.resources.use_gpu,
            resources_per_worker={"CPU": ctx.resources.cpus_per_worker},
        ),
        datasets={
            "train": ray_dataset(ds, "train", s["image_size"], view=job.view, text=s["method"] == "clip"),
            # Upstream accuracy is measured on the classes the model was trained on.
            "heldout": ray_dataset(ds, "test", s["image_size"], view=_heldout_view(job)),
        },
        dataset_config=ray.train.DataConfig(execution_options=ingest),
        run_config=ray.train.RunConfig(
            name=train_run_name(job),
            storage_path=ctx.storage_path,
            # MLflow records for the study; Tune sees each report too (progress lines).
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=ctx.resources.max_failures),
        ),
    )


def _pretrain_trial(config: dict, ctx: PhaseContext) -> dict:
    if ctx.past_deadline():
        return {NOT_LAUNCHED: 1}
    t0 = time.monotonic()
    apply_mlflow_client_env(ctx.mlflow_env)
    job = ctx.pretrain_jobs[config["job"]]
    run_id = ctx.run_ids[job.config_hash]
    tracker = Tracker(ctx.tracking_uri)
    try:
        result = build_pretrain_trainer(job, ctx, run_id, in_tune=True).fit()
        metrics = result.metrics or {}
        spool.flush(ctx.storage_path, tracker.client, run_id)  # reports the server missed
        tracker.log(
            run_id,
            metrics={"realized_label_noise": job.realized_label_noise, "num_train_samples": job.num_train_samples,
                     METRIC_TRIAL_SECONDS: time.monotonic() - t0},
            tags={TAG_CHECKPOINT: checkpoint_uri(result.checkpoint)},
        )
        tracker.finish(run_id)
        return {"upstream_accuracy": metrics.get("upstream_accuracy", float("nan")), "train_loss": metrics.get("train_loss")}
    except BaseException:
        try:
            tracker.finish(run_id, FAILED)
        except retry.TrackingUnavailable:
            pass  # the run stays RUNNING in MLflow; the next `transferlab run` resumes it
        raise


def _heldout_view(job: PretrainJob) -> PretrainView | None:
    """The held-out split under the same class and caption filters (no subset, no noise)."""
    v = job.view
    if v.keep_classes is None and not v.needs_captions:
        return None
    return PretrainView(v.source_fingerprint, None, 0.0, v.seed, job.num_classes, keep_classes=v.keep_classes,
                        caption_matches=v.caption_matches, caption_excludes=v.caption_excludes)


def feature_cache(storage_path: str):
    """The study storage's feature cache (shared by every study on that storage)."""
    from trainers.features import FeatureCache

    return FeatureCache(f"{storage_path.rstrip('/')}/feature_cache")


def record_fit(tracker: Tracker, ctx: PhaseContext, group: TransferGroup, fit: TransferFit, result, metrics: dict,
               artifacts: dict[str, object] | None = None) -> str:
    """Record one finished transfer fit: its run (created, or the one an earlier attempt left),
    params, the result's metrics and ``metrics``, the per-example outputs, ``artifacts`` (artifact
    path -> JSON-able object); then FINISHED. Returns the run id."""
    import tempfile

    run_id = ctx.run_ids.get(fit.config_hash)
    if run_id is None:
        run_id = tracker.create_run(ctx.experiment_id, KIND_TRANSFER, ctx.study, fit.run_name, fit.config_hash, group.params(fit),
                                    parent_run_id=ctx.run_ids[group.pretrain_hash])
    else:
        tracker.reopen(run_id)
        tracker.log(run_id, params=group.params(fit))
    tracker.log(run_id, metrics={**result.metrics, **metrics})
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/{PER_EXAMPLE_ARTIFACT.rsplit('/', 1)[1]}"
        result.outputs.to_parquet(path, index=False)
        tracker.client.log_artifact(run_id, path, PER_EXAMPLE_ARTIFACT.rsplit("/", 1)[0])
    for name, obj in (artifacts or {}).items():
        tracker.client.log_dict(run_id, obj, name)
    tracker.finish(run_id)
    return run_id


def _transfer_trial(config: dict, ctx: PhaseContext) -> dict:
    from ray.train import Checkpoint

    from datasets_ import open_dataset
    from trainers.devices import trial_device
    from trainers.transfer import FinetuneSettings, Fit, evaluate_transfer

    if ctx.past_deadline():
        return {NOT_LAUNCHED: 1}
    t0 = time.monotonic()
    apply_mlflow_client_env(ctx.mlflow_env)
    group = ctx.transfer_groups[config["group"]]
    tracker = Tracker(ctx.tracking_uri)
    task = open_dataset(group.task_root)
    ft = group.finetune
    # A searched group's dict has no lr grid; its fine-tuning fits run in the search phase.
    settings = FinetuneSettings(**{k: tuple(v) if k == "lr" else v for k, v in ft.items() if k != "search"})
    fits = [Fit(f.protocol, f.shots, f.seed, f.layer) for f in group.fits]
    with Checkpoint(ctx.checkpoints[group.pretrain_hash]).as_directory() as ckpt_dir:
        results, stats = evaluate_transfer(ckpt_dir, task, fits, group.val_fraction, settings, feature_cache(ctx.storage_path), group.image_size,
                                           trial_device(ctx.resources.use_gpu))
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


def _error_line(error_file: str | None) -> str:
    """The last line of a trial's error file: usually the exception and its message."""
    try:
        with open(error_file or "") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "FAILED"
    return f"FAILED: {retry.redact(lines[-1])[:300]}" if lines else "FAILED"


class Progress:
    """Live progress of one phase: a line per intermediate report (e.g. each epoch), per trial
    start and per finished or failed trial, each with the phase's counts (done / running /
    failed of total) and an ETA; a summary line at the end (:meth:`summary`).

    ``on_counts(counts)``, if given, receives the counts (``PHASE_trials_done`` ...) after every
    change; the study logs them on its MLflow run.
    """

    def __init__(self, phase: str, total: int, labels: dict[str, str], summarize, describe_report=None, on_counts=None):
        from ray import tune

        outer = self

        class _Callback(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                outer.started(trial)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                line = outer.describe_report(result) if outer.describe_report else None
                if line:
                    print(f"[{outer.phase}] {outer.label(trial)}: {line}", flush=True)

            def on_trial_complete(self, iteration, trials, trial, **info):
                outer.report(trial, ok=True)

            def on_trial_error(self, iteration, trials, trial, **info):
                outer.report(trial, ok=False)

        self.callback = _Callback()
        self.describe_report, self.on_counts = describe_report, on_counts
        self.phase, self.total, self.labels, self.summarize = phase, total, labels, summarize
        self.done = self.failed = self.running = self.not_launched = 0
        self.t0 = time.monotonic()
        self.errors: list[str] = []
        self.results: list[dict] = []  # the last result of every finished trial

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl in storage; the MLflow sink holds the
        # tracking URI, credentials included, which must never reach storage.
        return {**self.__dict__, "on_counts": None}

    def label(self, trial) -> str:
        key = next(iter(trial.config.values()))
        return self.labels.get(key, key)

    @property
    def counts(self) -> dict[str, int]:
        p = self.phase.replace("-", "_")
        return {f"{p}_trials_done": self.done, f"{p}_trials_running": self.running, f"{p}_trials_failed": self.failed,
                f"{p}_trials_not_launched": self.not_launched, f"{p}_trials_total": self.total}

    def _status(self) -> str:
        elapsed = time.monotonic() - self.t0
        ended = self.done + self.failed
        left = self.total - ended - self.not_launched
        # Each ended trial took elapsed/ended of wall time at the concurrency seen so far.
        eta = f"~{elapsed / ended * left:.0f}s left" if ended else "ETA after the first trial"
        return (f"done {self.done}, running {self.running}, failed {self.failed} of {self.total}; "
                f"{elapsed:.0f}s elapsed, {eta}")

    def _changed(self) -> None:
        if self.on_counts is not None:
            self.on_counts(self.counts)

    def started(self, trial) -> None:
        self.start(self.label(trial))

    def start(self, label: str) -> None:
        self.running += 1
        print(f"[{self.phase}] started {label}  ({self._status()})", flush=True)
        self._changed()

    def report(self, trial, ok: bool) -> None:
        error = "" if ok else _error_line(trial.error_file) + (f" (full traceback: {trial.error_file})" if trial.error_file else "")
        self.end(self.label(trial), ok, dict(trial.last_result or {}), error)

    def end(self, label: str, ok: bool, last: dict, error: str = "FAILED") -> None:
        """A trial (or a phase's unit of work) ended: ``last`` is its result, ``error`` the line
        said when it failed."""
        self.running = max(0, self.running - 1)
        if ok and last.get(NOT_LAUNCHED):
            self.not_launched += 1
            print(f"[{self.phase}] {label}: not launched (budget.max_hours reached)", flush=True)
            self._changed()
            return
        if ok:
            self.done += 1
            self.results.append(last)
            detail = self.summarize(last)
        else:
            self.failed += 1
            detail = error
            self.errors.append(label)
        n = self.done + self.failed
        print(f"[{self.phase} {n}/{self.total}] {label}: {detail}  ({self._status()})", flush=True)
        self._changed()

    def summary(self) -> str:
        never = self.total - self.done - self.failed - self.not_launched
        extra = f", {self.not_launched + never} not launched" if self.not_launched + never else ""
        return (f"[{self.phase}] phase over: {self.done} done, {self.failed} failed{extra} of {self.total} trials "
                f"in {time.monotonic() - self.t0:.0f}s")


def _fail_fast_stopper(progress: Progress):
    """A Tune stopper that ends the whole phase (running and pending trials) at the first failure."""
    from ray import tune

    class _FailFast(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return progress.failed > 0

    return _FailFast()


def _run_phase(phase: str, trainable, key: str, items: dict[str, str], ctx: PhaseContext, resources: float | dict, concurrency: int,
               summarize, describe_report=None, on_counts=None) -> Progress:
    """One Tune grid over ``items``, each trial holding ``resources`` (a CPU count, or a Ray
    resource dict such as ``{"CPU": 1, "GPU": 0.25}``), at most ``concurrency`` at once."""
    from ray import tune

    progress = Progress(phase, len(items), items, summarize, describe_report, on_counts)
    # Tune's own SIGINT handler ends only the current phase and returns normally, so Ctrl-C would
    # start the next phase and exit 0. Without it, Ctrl-C stops the study (exit 130, resumable).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, ctx=ctx), resources if isinstance(resources, dict) else {"CPU": resources}),
        param_space={key: tune.grid_search(list(items))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_dirname_creator=lambda t: f"{phase}-{t.trial_id}"),
        run_config=tune.RunConfig(
            name=f"{ctx.study}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=ctx.storage_path,
            callbacks=[progress.callback],
            stop=_fail_fast_stopper(progress) if ctx.fail_fast else None,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()
    print(progress.summary(), flush=True)
    return progress


def pretrain_concurrency(resources: Resources, cluster_cpus: float) -> int:
    """Concurrent pretraining trials that leave at least one CPU per trial for Ray Data ingest."""
    if resources.max_concurrent_trials:
        return resources.max_concurrent_trials
    per_trial = resources.workers * resources.cpus_per_worker + 1.0
    return max(1, int(math.floor(cluster_cpus / per_trial)))


def transfer_concurrency(cluster_cpus: float, resources: Resources | None = None, cluster_gpus: float | None = None) -> int:
    """Concurrent transfer trials: one CPU each, and with GPUs their share of one
    (``resources.light_trial_gpus``); the GPU count is unknown (None) when planning offline."""
    if resources is None or not resources.use_gpu or cluster_gpus is None:
        return max(1, int(cluster_cpus))
    return resources.light_concurrency({"CPU": cluster_cpus, "GPU": cluster_gpus})


def run_pretrain_phase(ctx: PhaseContext, jobs: list[PretrainJob], cluster_cpus: float, on_counts=None) -> Progress:
    items = {j.config_hash: j.run_name for j in jobs}
    # The trial only drives a TorchTrainer whose workers are scheduled on their own.
    return _run_phase(
        "pretrain", _pretrain_trial, "job", items, ctx, 0.01, pretrain_concurrency(ctx.resources, cluster_cpus),
        lambda r: f"upstream_accuracy={r.get('upstream_accuracy', float('nan')):.3f}",
        _describe_epoch, on_counts,
    )


def _describe_epoch(result: dict) -> str | None:
    if "epoch" not in result or "train_loss" not in result:
        return None
    return f"epoch {int(result['epoch']) + 1}: train_loss={result['train_loss']:.4f} ({result.get('images_per_second', 0):.0f} img/s)"


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (what light trials are packed onto)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def run_transfer_phase(ctx: PhaseContext, labels: dict[str, str], cluster_cpus: float, on_counts=None) -> Progress:
    return _run_phase(
        "transfer", _transfer_trial, "group", labels, ctx, ctx.resources.light_trial(),
        transfer_concurrency(cluster_cpus, ctx.resources, cluster_gpus()),
        lambda r: f"{r.get('fits', 0)} fits, mean accuracy {r.get('mean_accuracy', float('nan')):.3f}, "
                  f"features: {r.get('feature_extractions', 0)} extracted, {r.get('feature_cache_hits', 0)} from cache",
        on_counts=on_counts,
    )

