"""Running a study end to end: plan, skip what MLflow already holds, run the rest, summarize."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import retry, spool
from orchestrator.cluster import mlflow_client_env, ray_session
from orchestrator.plan import StudyPlan, build_plan
from orchestrator.preflight import checkpoint_exists
from orchestrator.results import results_table, transfer_frame
from orchestrator.spec import SpecError, StudySpec
from orchestrator.sweep import PhaseContext, run_pretrain_phase, run_transfer_phase
from orchestrator.tracking import (
    FAILED,
    FINISHED,
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    TAG_CHECKPOINT,
    VIEW_MASK_ARTIFACT,
    Tracker,
    resolve_tracking_uri,
)

DEFAULT_STORAGE = "transferlab_storage"


@dataclass
class StudyOutcome:
    study_run_id: str
    pretrain_total: int
    pretrain_ran: int
    transfer_total: int
    transfer_ran: int
    failed: list[str]
    table: str
    seconds: float
    summary: str | None = None  # a datamodels study's one-line outcome (it has no pretrain/transfer runs)


def _is_finished(run) -> bool:
    return run is not None and run.info.status == FINISHED


def _study_run(tracker: Tracker, exp: str, plan: StudyPlan) -> str:
    """The study's one top-level run, reused on every later ``run`` of the same study."""
    spec = plan.spec
    existing = sorted(tracker.runs(exp, KIND_STUDY), key=lambda r: r.info.start_time or 0)
    if existing:
        run_id = existing[0].info.run_id
        tracker.reopen(run_id)
        tracker.log(run_id, tags={"transferlab.spec_hash": plan.spec_hash})
        return run_id
    return tracker.create_run(
        exp, KIND_STUDY, spec.study, f"study {spec.study}", plan.spec_hash,
        {"study": spec.study}, tags={"transferlab.spec_hash": plan.spec_hash},
    )


def check_cluster(spec: StudySpec, resources: dict, embedded: bool) -> list[str]:
    """Problems that would make trials wait forever for resources the cluster lacks.

    On the private local Ray they are errors (nothing can appear later); on a cluster they are
    warnings, since an autoscaler may add nodes.
    """
    r = spec.resources
    problems = []
    if r.use_gpu and resources.get("GPU", 0) < 1:
        problems.append(("resources.use_gpu", "is true but the Ray cluster has no GPU"))
    need = r.workers * r.cpus_per_worker
    if need > resources.get("CPU", 0):
        problems.append(("resources.workers", f"{r.workers} workers x {r.cpus_per_worker:g} CPUs need {need:g} CPUs; the Ray cluster has {resources.get('CPU', 0):g}"))
    if embedded and problems:
        raise SpecError(*problems[0])
    return [f"{field}: {msg}" for field, msg in problems]


def run_study(
    spec: StudySpec,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    plan: StudyPlan | None = None,
) -> StudyOutcome:
    """Run every job of the study that MLflow does not hold as finished; return the outcome."""
    t0 = time.monotonic()
    uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    storage = storage_path or spec.storage_path or DEFAULT_STORAGE
    if "://" not in storage:  # a local directory; s3://, gs://... URIs are shared storage as they are
        storage = str(Path(storage).resolve())
    plan = plan or build_plan(spec)
    with ray_session(address) as embedded:
        import ray

        for warning in check_cluster(spec, ray.cluster_resources(), embedded):
            print(f"warning: {warning} (trials wait until the cluster can hold them)", file=sys.stderr)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        outcome = _run(spec, plan, uri, storage, cpus)
    outcome.seconds = time.monotonic() - t0
    return outcome


def _run(spec: StudySpec, plan: StudyPlan, uri: str, storage: str, cpus: float) -> StudyOutcome:
    tracker = Tracker(uri)
    exp = tracker.experiment_id(spec.study)
    spool.flush(storage, tracker.client)  # metrics an earlier run could not deliver
    study_run = _study_run(tracker, exp, plan)
    if plan.datamodels is not None:
        return _run_datamodels(spec, plan, tracker, exp, study_run, storage, cpus, uri)

    pre_runs = tracker.runs_by_hash(exp, KIND_PRETRAIN)
    todo = [j for j in plan.pretrain_jobs if not _is_finished(pre_runs.get(j.config_hash))]
    done_fits = {h for h, r in tracker.runs_by_hash(exp, KIND_TRANSFER).items() if _is_finished(r)}
    todo_fits = sum(1 for g in plan.transfer_groups for f in g.fits if f.config_hash not in done_fits)
    print(
        f"study '{spec.study}': {len(plan.pretrain_jobs)} pretraining runs ({len(plan.pretrain_jobs) - len(todo)} already done), "
        f"{plan.num_transfer_fits} transfer fits ({plan.num_transfer_fits - todo_fits} already done)\n"
        f"tracking: {retry.redact(uri)}   experiment: {spec.study}   storage: {storage}",
        flush=True,
    )

    # Credentials in the URI travel with the other secrets, never inside a URI Ray may store.
    worker_uri, uri_credentials = retry.split_credentials(uri)
    ctx = PhaseContext(study=spec.study, tracking_uri=worker_uri, experiment_id=exp, storage_path=storage, resources=spec.resources,
                       mlflow_env={**mlflow_client_env(), **uri_credentials})
    for job in todo:
        prior = pre_runs.get(job.config_hash)
        if prior is not None:  # interrupted or failed before: resume into the same run
            run_id = prior.info.run_id
            tracker.reopen(run_id)
        else:
            run_id = tracker.create_run(exp, KIND_PRETRAIN, spec.study, job.run_name, job.config_hash, job.params, parent_run_id=study_run)
            if job.view.keep_classes is not None:
                classes = plan.data[f"sources.{job.source}"].classes
                mask = [c in job.view.keep_classes for c in range(job.num_classes)]
                tracker.client.log_dict(run_id, {"classes": classes, "included": mask}, VIEW_MASK_ARTIFACT)
        ctx.run_ids[job.config_hash] = run_id
        ctx.pretrain_jobs[job.config_hash] = job

    failed: list[str] = []
    missing: set[str] = set()  # pretraining runs whose checkpoint is gone (said once each)
    transfer_ran = 0
    feature_counts = {"feature_extractions": 0, "feature_cache_hits": 0}
    status = FAILED
    try:
        if todo:
            failed += run_pretrain_phase(ctx, todo, cpus).errors

        pre_runs = tracker.runs_by_hash(exp, KIND_PRETRAIN)
        transfer_runs = tracker.runs_by_hash(exp, KIND_TRANSFER)
        names = {j.config_hash: j.run_name for j in plan.pretrain_jobs}
        labels = {}
        for g in plan.transfer_groups:
            pre = pre_runs.get(g.pretrain_hash)
            fits = tuple(f for f in g.fits if not _is_finished(transfer_runs.get(f.config_hash)))
            if not fits or not _is_finished(pre):
                continue
            checkpoint = pre.data.tags.get(TAG_CHECKPOINT, "")
            if not checkpoint_exists(checkpoint):
                # Chosen behaviour: fail these fits and say how to redo the pretraining, rather
                # than silently retraining a model other finished fits were computed from.
                line = (f"checkpoint of pretraining run '{names[g.pretrain_hash]}' (run {pre.info.run_id}) is missing: "
                        f"{checkpoint or '(no checkpoint recorded)'}; the transfer fits that need it were not run. "
                        f"To redo that pretraining, delete the run (mlflow runs delete --run-id {pre.info.run_id}) "
                        f"and run the same command again")
                if pre.info.run_id not in missing:
                    print(f"error: {line}", file=sys.stderr, flush=True)
                    missing.add(pre.info.run_id)
                failed.append(f"{names[g.pretrain_hash]} -> {g.task} (missing checkpoint)")
                continue
            key = f"{g.pretrain_hash}:{g.task}"
            ctx.transfer_groups[key] = dataclasses.replace(g, fits=fits)
            ctx.run_ids[g.pretrain_hash] = pre.info.run_id
            ctx.checkpoints[g.pretrain_hash] = pre.data.tags[TAG_CHECKPOINT]
            for f in fits:
                if f.config_hash in transfer_runs:  # an earlier attempt left it unfinished
                    ctx.run_ids[f.config_hash] = transfer_runs[f.config_hash].info.run_id
            labels[key] = f"{names[g.pretrain_hash]} -> {g.task} ({len(fits)} fits)"
            transfer_ran += len(fits)
        if labels:
            progress = run_transfer_phase(ctx, labels, cpus)
            failed += progress.errors
            for k in feature_counts:
                feature_counts[k] += sum(int(r.get(k, 0)) for r in progress.results)
        spool.flush(storage, tracker.client)
        status = FINISHED if not failed else FAILED
    finally:
        counts = {
            "pretrain_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_PRETRAIN).values() if _is_finished(r)),
            "transfer_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_TRANSFER).values() if _is_finished(r)),
            "failed_runs": len(failed),
            # This invocation's transfer work: fits run, and how their frozen features were had.
            "transfer_fits_run": transfer_ran,
            **feature_counts,
        }
        # One step per invocation of `run`, so the study run shows how the study grew.
        step = len(tracker.client.get_metric_history(study_run, "pretrain_runs"))
        tracker.log(study_run, metrics=counts, step=step)
        tracker.finish(study_run, status)

    return StudyOutcome(
        study_run_id=study_run,
        pretrain_total=len(plan.pretrain_jobs),
        pretrain_ran=len(todo),
        transfer_total=plan.num_transfer_fits,
        transfer_ran=transfer_ran,
        failed=failed,
        table=results_table(transfer_frame(tracker, spec.study)),
        seconds=0.0,
    )


def _run_datamodels(spec: StudySpec, plan: StudyPlan, tracker: Tracker, exp: str, study_run: str, storage: str, cpus: float,
                    uri: str) -> StudyOutcome:
    from orchestrator.datamodels import run_datamodels

    worker_uri, uri_credentials = retry.split_credentials(uri)
    status = FAILED
    try:
        dm = run_datamodels(spec, plan.datamodels, tracker, exp, study_run, storage, cpus, worker_uri,
                            {**mlflow_client_env(), **uri_credentials})
        status = FINISHED if not dm.failed and dm.done == dm.total else FAILED
    finally:
        step = len(tracker.client.get_metric_history(study_run, "failed_runs"))
        tracker.log(study_run, metrics={"failed_runs": 0 if status == FINISHED else 1}, step=step)
        tracker.finish(study_run, status)
    failed = [f"datamodels trial {x}" for x in dm.failed]
    return StudyOutcome(study_run, 0, 0, 0, 0, failed, "", 0.0, summary=dm.summary())
