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
from orchestrator.search import run_search_phase
from orchestrator.spec import SpecError, StudySpec
from orchestrator.sweep import PhaseContext, run_pretrain_phase, run_transfer_phase
from orchestrator.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
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
    # Why the study stopped before its end, on purpose (budget.max_hours, --fail-fast); None if
    # it ran to the end. Resumable: the same command continues.
    stopped: str | None = None


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
    fail_fast: bool = False,
) -> StudyOutcome:
    """Run every job of the study that MLflow does not hold as finished; return the outcome.

    No trial starts work once ``spec.budget.max_hours`` have passed since this call (running
    ones finish); with ``fail_fast`` the study stops at the first failed trial. Runs it stops
    are marked KILLED in MLflow and resumed by the next call.
    """
    t0 = time.monotonic()
    hours = spec.budget.max_hours
    deadline = time.time() + hours * 3600.0 if hours is not None else None
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
        outcome = _run(spec, plan, uri, storage, cpus, deadline, fail_fast)
    outcome.seconds = time.monotonic() - t0
    return outcome


def _settle_orphans(tracker: Tracker, exp: str, keep: set[str]) -> None:
    """Mark FAILED the runs an earlier, killed driver left RUNNING that this run will not reopen
    (superseded by a finished run of the same job, or no longer in the grid)."""
    for kind in (KIND_PRETRAIN, KIND_TRANSFER):
        for r in tracker.runs(exp, kind):
            if r.info.status == RUNNING and r.info.run_id not in keep:
                print(f"note: run {r.info.run_id} ('{r.info.run_name}') was left RUNNING by an interrupted driver "
                      f"and is not resumed by this run; marked FAILED", flush=True)
                tracker.finish(r.info.run_id, FAILED)


def _kill_leftovers(tracker: Tracker, exp: str) -> None:
    """Runs still RUNNING when this driver is done were stopped by it (budget, fail-fast, an
    exception): KILLED, so no run stays RUNNING; the next ``run`` reopens them."""
    for kind in (KIND_PRETRAIN, KIND_TRANSFER):
        for r in tracker.runs(exp, kind):
            if r.info.status == RUNNING:
                tracker.finish(r.info.run_id, KILLED)


def _progress_logger(tracker: Tracker, run_id: str, step: int):
    """Log a phase's live trial counts on the study run; best effort, without retries, so that
    a slow tracking server never stalls Tune's event loop (the final counts are logged after)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)

    def log(counts: dict) -> None:
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in counts.items()])
        except Exception as e:  # noqa: BLE001 - progress metrics are not worth a failed study
            print(f"warning: could not log progress on the study run: {type(e).__name__}", file=sys.stderr)

    return log


def _run(spec: StudySpec, plan: StudyPlan, uri: str, storage: str, cpus: float, deadline: float | None = None,
         fail_fast: bool = False) -> StudyOutcome:
    tracker = Tracker(uri)
    exp = tracker.experiment_id(spec.study)
    spool.flush(storage, tracker.client)  # metrics an earlier run could not deliver
    study_run = _study_run(tracker, exp, plan)
    if plan.datamodels is not None:
        return _run_datamodels(spec, plan, tracker, exp, study_run, storage, cpus, uri, fail_fast, deadline)

    pre_runs = tracker.runs_by_hash(exp, KIND_PRETRAIN)
    todo = [j for j in plan.pretrain_jobs if not _is_finished(pre_runs.get(j.config_hash))]
    all_fits = tracker.runs_by_hash(exp, KIND_TRANSFER)
    done_fits = {h for h, r in all_fits.items() if _is_finished(r)}
    reopened = {pre_runs[j.config_hash].info.run_id for j in todo if j.config_hash in pre_runs}
    reopened |= {all_fits[f.config_hash].info.run_id for g in plan.transfer_groups for f in g.fits
                 if f.config_hash in all_fits and f.config_hash not in done_fits}
    _settle_orphans(tracker, exp, reopened)
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
                       mlflow_env={**mlflow_client_env(), **uri_credentials}, deadline=deadline, fail_fast=fail_fast)
    step = len(tracker.client.get_metric_history(study_run, "pretrain_runs"))  # one step per `run`
    on_counts = _progress_logger(tracker, study_run, step)
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
    stopped: str | None = None
    crash: BaseException | None = None
    not_launched = 0  # trials that never started work (budget.max_hours)
    try:
        if todo:
            progress = run_pretrain_phase(ctx, todo, cpus, on_counts)
            failed += progress.errors
            not_launched += progress.total - progress.done - progress.failed
        if failed and fail_fast:
            stopped = "the first failed trial (--fail-fast)"
            raise _Stop

        pre_runs = tracker.runs_by_hash(exp, KIND_PRETRAIN)
        transfer_runs = tracker.runs_by_hash(exp, KIND_TRANSFER)
        names = {j.config_hash: j.run_name for j in plan.pretrain_jobs}
        labels = {}
        searches = {}  # fit hash -> label of the fits tuned in the finetune-search phase
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
            ctx.run_ids[g.pretrain_hash] = pre.info.run_id
            ctx.checkpoints[g.pretrain_hash] = pre.data.tags[TAG_CHECKPOINT]
            for f in fits:
                if f.config_hash in transfer_runs:  # an earlier attempt left it unfinished
                    ctx.run_ids[f.config_hash] = transfer_runs[f.config_hash].info.run_id
                if g.searched(f):  # tuned by its own Tune search, in the phase after this one
                    ctx.searches[f.config_hash] = (g, f)
                    searches[f.config_hash] = f"{names[g.pretrain_hash]} -> {f.run_name}"
            plain = tuple(f for f in fits if not g.searched(f))
            if plain:
                ctx.transfer_groups[key] = dataclasses.replace(g, fits=plain)
                labels[key] = f"{names[g.pretrain_hash]} -> {g.task} ({len(plain)} fits)"
            transfer_ran += len(fits)
        if (labels or searches) and ctx.past_deadline():
            not_launched += len(labels) + len(searches)
            transfer_ran = 0
            raise _Stop
        if labels:
            progress = run_transfer_phase(ctx, labels, cpus, on_counts)
            failed += progress.errors
            not_launched += progress.total - progress.done - progress.failed
            for k in feature_counts:
                feature_counts[k] += sum(int(r.get(k, 0)) for r in progress.results)
            if failed and fail_fast:
                stopped = "the first failed trial (--fail-fast)"
        if searches and not (failed and fail_fast):
            progress = run_search_phase(ctx, searches, cpus, on_counts)
            failed += progress.errors
            not_launched += progress.total - progress.done - progress.failed
            if failed and fail_fast:
                stopped = "the first failed trial (--fail-fast)"
        spool.flush(storage, tracker.client)
        status = FINISHED if not failed else FAILED
    except _Stop:
        pass
    except BaseException as e:
        crash = e
        raise
    finally:
        if stopped is None and not_launched and ctx.past_deadline():
            stopped = f"budget.max_hours ({spec.budget.max_hours:g} h) reached; {not_launched} trial(s) not launched"
            status = KILLED
        if not isinstance(crash, retry.TrackingUnavailable):  # else the next `run` settles them
            _kill_leftovers(tracker, exp)
        counts = {
            "pretrain_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_PRETRAIN).values() if _is_finished(r)),
            "transfer_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_TRANSFER).values() if _is_finished(r)),
            "failed_runs": len(failed),
            # This invocation's transfer work: fits run, and how their frozen features were had.
            "transfer_fits_run": transfer_ran,
            **feature_counts,
        }
        # One step per invocation of `run`, so the study run shows how the study grew.
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
        stopped=stopped,
    )


def _run_datamodels(spec: StudySpec, plan: StudyPlan, tracker: Tracker, exp: str, study_run: str, storage: str, cpus: float,
                    uri: str, fail_fast: bool = False, deadline: float | None = None) -> StudyOutcome:
    from orchestrator.datamodels import run_datamodels

    worker_uri, uri_credentials = retry.split_credentials(uri)
    status = FAILED
    stopped = None
    try:
        dm = run_datamodels(spec, plan.datamodels, tracker, exp, study_run, storage, cpus, worker_uri,
                            {**mlflow_client_env(), **uri_credentials}, fail_fast, deadline)
        status = FINISHED if not dm.failed and dm.done == dm.total else FAILED
        if dm.not_launched and not dm.failed:
            stopped = f"budget.max_hours ({spec.budget.max_hours:g} h) reached; {dm.not_launched} datamodel trial(s) not launched"
            status = KILLED
    finally:
        step = len(tracker.client.get_metric_history(study_run, "failed_runs"))
        tracker.log(study_run, metrics={"failed_runs": 0 if status == FINISHED else 1}, step=step)
        tracker.finish(study_run, status)
    failed = [f"datamodels trial {x}" for x in dm.failed]
    return StudyOutcome(study_run, 0, 0, 0, 0, failed, "", 0.0, summary=dm.summary(), stopped=stopped)


class _Stop(Exception):
    """Internal: leave the phases early (fail-fast, budget); the outcome says why."""
