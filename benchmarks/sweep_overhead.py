"""Datamodel sweep throughput and per-trial orchestration overhead (run by hand, not in tests).

1. models/hour of a datamodel sweep (builtin:digits -> builtin:digits, tiny-cnn, 8x8) with B
   models stacked per trial (torch.func vmap) vs one model per trial (B=1), same Ray, same store.
2. Per-trial overhead of ``--trials`` trivial trials through transferlab's phase runner (its
   Tune setup, progress callback, one MLflow run and one Parquet part per trial, as a datamodel
   trial records) vs a bare Ray Tune function-trainable loop doing nothing.

    PYTHONPATH=. python benchmarks/sweep_overhead.py --models 24 --per-trial 12 --trials 50

Prints a Markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

from orchestrator.execution.phase import TrialContext

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def sweep_seconds(models: int, per_trial: int, root: str, epochs: int) -> float:
    from orchestrator.execution.study import run_study
    from orchestrator.planning.plan import build_plan
    from orchestrator.spec import parse_spec

    spec = parse_spec(
        {
            "study": f"bench-b{per_trial}",
            "sources": {"src": {"uri": "builtin:digits"}},
            "tasks": {"digits": {"uri": "builtin:digits"}},
            "pretrain": {"model": "tiny-cnn", "image_size": 8, "epochs": epochs, "batch_size": 32, "lr": 0.01},
            "datamodels": {
                "source": "src",
                "task": "digits",
                "num_models": models,
                "class_fraction": 0.5,
                "models_per_trial": per_trial,
            },
            "resources": {"cpus_per_worker": 1},
        }
    )
    plan = build_plan(spec)
    t0 = time.perf_counter()
    out = run_study(
        spec,
        tracking_uri=f"sqlite:///{root}/mlflow-b{per_trial}.db",
        storage_path=f"{root}/storage-b{per_trial}",
        plan=plan,
    )
    assert not out.failed, out.failed
    return time.perf_counter() - t0


@dataclass(kw_only=True)
class _Ctx(TrialContext):
    table: str


def _recorded_noop(config: dict, ctx: _Ctx) -> dict:
    """What a datamodel trial records, without training: one MLflow run and one Parquet part."""
    import pyarrow as pa

    from orchestrator.records.datamodel_table import TABLE_SCHEMA, write_part
    from orchestrator.records.tracker import Tracker

    i = int(config["trial"])
    write_part(ctx.table, (i,), pa.Table.from_pylist([], schema=TABLE_SCHEMA))
    tracker = Tracker(ctx.tracking_uri)
    run_id = tracker.create_run(
        ctx.experiment_id, "datamodel_batch", ctx.study, f"noop {i}", f"noop-{i}", {"first_model": i}
    )
    tracker.log(run_id, metrics={"models": 0})
    tracker.finish(run_id)
    return {"models": 0}


def overhead(trials: int, root: str, reuse: bool = True) -> tuple[float, float, float]:
    """(transferlab phase seconds, bare Tune seconds, bare Tune seconds reusing trial actors)
    for ``trials`` trivial trials; ``reuse``: transferlab's trial processes serve several trials
    (its default), or one each (``TRANSFERLAB_REUSE_TRIAL_PROCESSES=0``)."""
    from ray import tune

    from orchestrator.execution.phase import run_phase
    from orchestrator.records.tracker import Tracker

    os.environ["TRANSFERLAB_REUSE_TRIAL_PROCESSES"] = "1" if reuse else "0"
    uri = f"sqlite:///{root}/mlflow-noop-{reuse}.db"
    exp = Tracker(uri).experiment_id("noop")
    ctx = _Ctx(
        study="noop",
        storage_path=f"{root}/storage-noop-{reuse}",
        tracking_uri=uri,
        experiment_id=exp,
        table=f"{root}/storage-noop-{reuse}/table",
    )
    items = {f"{i:06d}": f"noop {i}" for i in range(trials)}
    t0 = time.perf_counter()
    progress = run_phase("noop", _recorded_noop, "trial", items, ctx, 1.0, 4, lambda r: "ok")
    ours = time.perf_counter() - t0
    assert not progress.errors, progress.errors
    if not reuse:
        return ours, float("nan"), float("nan")

    bare = []
    for reuse in (False, True):
        t0 = time.perf_counter()
        tune.Tuner(
            tune.with_resources(lambda config: {"x": config["i"]}, {"CPU": 1.0}),
            param_space={"i": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=4, reuse_actors=reuse),
            run_config=tune.RunConfig(name=f"bare-{reuse}", storage_path=f"{root}/storage-bare", verbose=0),
        ).fit()
        bare.append(time.perf_counter() - t0)
    return ours, *bare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=24)
    p.add_argument("--per-trial", type=int, default=12)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trials", type=int, default=50, help="trivial trials of the overhead comparison (0: skip it)")
    p.add_argument("--skip-sweep", action="store_true", help="only the overhead comparison")
    args = p.parse_args()
    import ray

    from orchestrator.execution.ray_connection import WORKER_ENV, quiet_ray_logs

    quiet_ray_logs()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
        log_to_driver=False,
    )
    m = args.models
    rows = ["| what | wall | figure |", "|---|---|---|"]

    def row(line: str) -> None:  # printed as soon as measured: a long run keeps what it has
        rows.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as root:
        if not args.skip_sweep:
            t = sweep_seconds(m, args.per_trial, root, args.epochs)
            row(
                f"| datamodel sweep, {m} models, B={args.per_trial} per trial ({-(-m // args.per_trial)} trials) | "
                f"{t:.1f} s | {3600 * m / t:,.0f} models/hour |"
            )
            t = sweep_seconds(m, 1, root, args.epochs)
            row(f"| same sweep, B=1 ({m} trials) | {t:.1f} s | {3600 * m / t:,.0f} models/hour |")
        if args.trials:
            fresh, _, _ = overhead(args.trials, root, reuse=False)
            row(
                f"| {args.trials} trivial trials, transferlab phase runner, a fresh process per trial "
                f"(`TRANSFERLAB_REUSE_TRIAL_PROCESSES=0`) | {fresh:.1f} s | {fresh / args.trials:.2f} s/trial |"
            )
            ours, bare, bare_reused = overhead(args.trials, root)
            row(
                f"| {args.trials} trivial trials, transferlab phase runner (+1 MLflow run, 1 Parquet part each) | "
                f"{ours:.1f} s | {ours / args.trials:.2f} s/trial |"
            )
            row(
                f"| {args.trials} trivial trials, bare Ray Tune function trainable | {bare:.1f} s | "
                f"{bare / args.trials:.2f} s/trial |"
            )
            row(
                f"| {args.trials} trivial trials, bare Ray Tune, `reuse_actors=True` | {bare_reused:.1f} s | "
                f"{bare_reused / args.trials:.2f} s/trial |"
            )
    ray.shutdown()
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
