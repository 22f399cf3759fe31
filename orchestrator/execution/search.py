"""Ray Tune search over the fine-tuning hyperparameters of finetune / lp_ft fits
(``transfer.finetune.search``): the ``finetune-search`` phase of a study.

Each searched fit (checkpoint × task × protocol × shots × seed) gets its own ``Tuner``, launched
from the driver after the transfer phase: a Tuner started inside a 1-CPU transfer trial would wait
for CPUs the outer phase holds. Its ``num_samples`` trials are plain Tune *function* trials (no
TorchTrainer), one config each, drawn log-uniformly (``tune.loguniform``) by a
``BasicVariantGenerator`` seeded with ``search.seed``; each loads the checkpoint and decodes the
task once, fine-tunes with :func:`trainers.transfer.train_finetune` (the grid's loop) and reports
``val_accuracy`` every ``eval_every`` steps, so that ``ASHAScheduler(metric="val_accuracy",
mode="max")`` can stop the worse configs at its rungs (``random``: no scheduler).

The config with the best validation accuracy among the trials that ran every step (ties: the
first sampled) is then retrained, deterministically (same seed, one thread, so it is the chosen
trial's network again), in a Ray actor kept for the phase, which scores the test split — never
read before — and records the fit's MLflow run (:func:`~orchestrator.execution.transfer_phase.record_fit`) with
``search/trials.json``.
A fit whose run is FINISHED is skipped by the next ``run``; one cut short by ``budget.max_hours``
or a failure is searched again from scratch.
"""

from __future__ import annotations

import time

from orchestrator.execution.phase import (
    NOT_LAUNCHED,
    PhaseContext,
    Progress,
    cluster_gpus,
    phase_stopper,
    trial_name,
)
from orchestrator.execution.transfer_phase import feature_cache, record_fit, trainer_fit
from orchestrator.planning.estimate import transfer_concurrency
from orchestrator.records.credentials import apply_mlflow_client_env
from orchestrator.records.retry import check_outage, redact
from orchestrator.spec import FinetuneSearch
from trainers.devices import trial_device
from trainers.transfer import finetune_problem

PHASE = "finetune-search"
TRIALS_ARTIFACT = "search/trials.json"


def search_space(search: FinetuneSearch) -> dict:
    """Tune's param_space of a search: log-uniform ranges, a fixed weight decay as it is."""
    from ray import tune

    wd = search.weight_decay
    return {
        "lr": tune.loguniform(*search.lr),
        "weight_decay": tune.loguniform(*wd) if isinstance(wd, (list, tuple)) else float(wd),
    }


def scheduler(search: FinetuneSearch, steps: int):
    """ASHA over steps for ``asha``; None (every trial runs every step) for ``random``."""
    if search.algorithm != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        metric="val_accuracy",
        mode="max",
        max_t=steps,
        grace_period=search.grace_steps,
        reduction_factor=search.reduction_factor,
    )


def choose(trials: list[dict], steps: int) -> dict:
    """The chosen trial: the best validation accuracy among those that reached ``steps`` (ASHA
    lets at least one through), the first sampled on ties; any trial if none did."""
    full = [t for t in trials if t["steps"] == steps and t["val_accuracy"] is not None]
    pool = full or [t for t in trials if t["val_accuracy"] is not None]
    if not pool:
        raise RuntimeError("no search trial reported a validation accuracy")
    return max(pool, key=lambda t: (t["val_accuracy"], -t["trial"]))


# This process's last FinetuneProblem: Tune reuses a search's trial actors (reuse_actors), so
# the configs after a process's first one skip the checkpoint load and the task's decode.
_LAST_PROBLEM: dict[tuple[str, str], object] = {}


def _problem(ctx: PhaseContext, key: str):
    """The fit's FinetuneProblem, on whichever node this runs (paths/URIs come in ``ctx``);
    built once per process and fit (it is only read: every config trains a copy)."""
    group, _ = ctx.searches[key]
    memo = (key, ctx.checkpoints[group.pretrain_hash])
    if memo not in _LAST_PROBLEM:
        _LAST_PROBLEM.clear()
        _LAST_PROBLEM[memo] = _build_problem(ctx, key)
    return _LAST_PROBLEM[memo]


def _build_problem(ctx: PhaseContext, key: str):
    from ray.train import Checkpoint

    group, fit = ctx.searches[key]
    task = ctx.open_data(f"tasks.{group.task}")
    with Checkpoint(ctx.checkpoints[group.pretrain_hash]).as_directory() as ckpt_dir:
        return finetune_problem(
            ckpt_dir,
            task,
            trainer_fit(fit),
            group.config,
            feature_cache(ctx.storage_path),
            trial_device(ctx.resources.use_gpu),
        )


def _search_trial(config: dict, ctx: PhaseContext, key: str) -> None:
    """One config: fine-tune and report validation accuracy every ``eval_every`` steps."""
    import torch
    from ray import tune

    if ctx.past_deadline():
        return  # reports nothing: the search is incomplete and the fit is not recorded
    torch.set_num_threads(1)  # as the retraining (_final_fit): the same arithmetic, the same network
    group, _ = ctx.searches[key]
    ft = group.config.finetune
    problem = _problem(ctx, key)
    problem.train(
        config["lr"],
        config["weight_decay"],
        ft.steps,
        ft.batch_size,
        group.search.eval_every,
        lambda step, net: tune.report({"val_accuracy": problem.validation_accuracy(net), "step": step}),
    )


def _final_fit(ctx: PhaseContext, key: str, chosen: dict, trials: list[dict], seconds: float) -> dict:
    """Retrain the chosen config, score the test split, record the fit's run."""
    import torch

    torch.set_num_threads(1)
    apply_mlflow_client_env(ctx.mlflow_env)
    group, fit = ctx.searches[key]
    ft = group.config.finetune
    problem = _problem(ctx, key)
    net = problem.train(chosen["lr"], chosen["weight_decay"], ft.steps, ft.batch_size)
    val_acc = problem.validation_accuracy(net)
    result = problem.test(
        net, validation_accuracy=val_acc, learning_rate=chosen["lr"], weight_decay=chosen["weight_decay"]
    )
    stopped = sum(t["stopped_early"] for t in trials)
    record_fit(
        ctx.tracker(),
        ctx,
        group,
        fit,
        result,
        {"search_trials": len(trials), "search_trials_stopped_early": stopped, "search_seconds": seconds},
        {
            TRIALS_ARTIFACT: {
                "algorithm": group.search.algorithm,
                "max_steps": ft.steps,
                "chosen": chosen["trial"],
                "trials": trials,
            }
        },
    )
    return {
        "accuracy": result.metrics["accuracy"],
        "validation_accuracy": val_acc,
        "lr": chosen["lr"],
        "weight_decay": chosen["weight_decay"],
        "trials": len(trials),
        "stopped_early": stopped,
    }


class _Finisher:
    """One process for the phase that retrains each fit's chosen config (:func:`_final_fit`):
    started with the phase, it imports torch, the trainers and MLflow while the first search
    runs instead of after each. It reserves no CPU: it works only between two searches, when no
    trial of the phase runs (a reserved CPU would be one trial fewer, or on a 1-CPU cluster a
    deadlock)."""

    def __init__(self):
        import mlflow  # noqa: F401
        import ray.train  # noqa: F401

        import trainers.transfer  # noqa: F401

    def finish(self, ctx: PhaseContext, key: str, chosen: dict, trials: list[dict], seconds: float) -> dict:
        return _final_fit(ctx, key, chosen, trials, seconds)


def _trials(results, steps: int) -> list[dict]:
    """Every trial of a finished search, in sampling order: config, steps reached, validation
    accuracy at each report. Raises if a trial failed."""
    out = []
    # Trial ids (ending each trial's folder name, after the fit's label) count up in sampling order.
    for i, r in enumerate(sorted(results, key=lambda r: r.path)):
        if r.error is not None:
            raise RuntimeError(
                f"search trial {i} failed: {type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:200]}"
            )
        df = r.metrics_dataframe
        history = (
            []
            if df is None or "step" not in df
            else [{"step": int(s), "val_accuracy": float(a)} for s, a in zip(df["step"], df["val_accuracy"])]
        )
        reached = history[-1]["step"] if history else 0
        out.append(
            {
                "trial": i,
                "lr": float(r.config["lr"]),
                "weight_decay": float(r.config["weight_decay"]),
                "steps": reached,
                "val_accuracy": history[-1]["val_accuracy"] if history else None,
                "stopped_early": 0 < reached < steps,
                "history": history,
            }
        )
    return out


class _Watch:
    """Per-trial progress lines of one search, and a stopper for the budget and --fail-fast."""

    def __init__(self, ctx: PhaseContext, label: str, steps: int):
        from ray import tune

        watch = self
        self.failed = False

        class Lines(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                c = trial.config
                print(
                    f"[{PHASE}] {label}: trial {trial.trial_id} started, lr={c['lr']:.3g} "
                    f"weight_decay={c['weight_decay']:.3g}",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                r = trial.last_result or {}
                step = int(r.get("step", 0))
                early = " (stopped early by ASHA)" if 0 < step < steps else ""
                print(
                    f"[{PHASE}] {label}: trial {trial.trial_id} ended at step {step}/{steps}, "
                    f"val_accuracy={r.get('val_accuracy', float('nan')):.3f}{early}",
                    flush=True,
                )

            def on_trial_error(self, iteration, trials, trial, **info):
                watch.failed = True
                print(f"[{PHASE}] {label}: trial {trial.trial_id} FAILED (traceback: {trial.error_file})", flush=True)

        # Tune pickles stoppers and callbacks into its storage: they hold no ctx (credentials).
        self.callback, self.stopper = Lines(), phase_stopper(ctx.deadline, ctx.fail_fast, lambda: watch.failed)


def search_fit(ctx: PhaseContext, key: str, label: str, cluster_cpus: float, finisher) -> dict:
    """Search one fit's hyperparameters, then have ``finisher`` (a :class:`_Finisher` actor)
    retrain the best config and record the fit; the outcome (``{NOT_LAUNCHED: 1}`` if
    ``budget.max_hours`` passed before the search was over)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t0 = time.monotonic()
    group, _ = ctx.searches[key]
    steps, s = group.config.finetune.steps, group.search
    watch = _Watch(ctx, label, steps)
    # The generator bounds concurrency itself: Tune ignores max_concurrent_trials with one.
    sampler = BasicVariantGenerator(
        random_state=s.seed,
        max_concurrent=min(
            s.num_samples, s.max_concurrent_trials or transfer_concurrency(cluster_cpus, ctx.resources, cluster_gpus())
        ),
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_search_trial, ctx=ctx, key=key), ctx.resources.light_trial()),
        param_space=search_space(s),
        tune_config=tune.TuneConfig(
            num_samples=s.num_samples,
            search_alg=sampler,
            scheduler=scheduler(s, steps),
            reuse_actors=True,
            trial_name_creator=lambda t: trial_name(label, t.trial_id),
            trial_dirname_creator=lambda t: trial_name(label, t.trial_id),
        ),
        run_config=tune.RunConfig(
            name=f"{ctx.study}-search-{key[:12]}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=ctx.storage_path,
            callbacks=[watch.callback],
            stop=watch.stopper,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    results = tuner.fit()
    if ctx.past_deadline():
        return {NOT_LAUNCHED: 1}
    trials = _trials(results, steps)
    chosen = choose(trials, steps)
    return ray.get(finisher.finish.remote(ctx, key, chosen, trials, time.monotonic() - t0))


def run_search_phase(ctx: PhaseContext, labels: dict[str, str], cluster_cpus: float, on_counts=None) -> Progress:
    """Every searched fit of ``ctx.searches`` (fit hash -> label), one search after the other
    (each runs its trials in parallel); progress counts fits."""
    progress = Progress(
        PHASE,
        len(labels),
        labels,
        lambda r: (
            f"chose lr={r['lr']:.3g} weight_decay={r['weight_decay']:.3g} (validation {r['validation_accuracy']:.3f}), "
            f"test accuracy {r['accuracy']:.3f}; {r['trials']} trials, {r['stopped_early']} stopped early"
        ),
        on_counts=on_counts,
    )
    import ray

    finisher = None
    try:
        for key, label in labels.items():
            if ctx.past_deadline() or (ctx.fail_fast and progress.failed):
                break
            check_outage(ctx.tracking_uri)  # the study's tracking outage is past its deadline: stop
            # With GPUs it holds a trial's GPU share, so the retraining runs on the device the
            # search ran on (the same arithmetic, the same network).
            gpus = ctx.resources.light_trial().get("GPU", 0)
            finisher = finisher or ray.remote(num_cpus=0, num_gpus=gpus)(_Finisher).remote()
            progress.start(label)
            try:
                progress.end(label, True, search_fit(ctx, key, label, cluster_cpus, finisher))
            except Exception as e:
                last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                progress.end(label, False, {}, f"FAILED: {redact(last)[:300]}")
    finally:
        if finisher is not None:
            ray.kill(finisher)
    print(progress.summary(), flush=True)
    return progress
