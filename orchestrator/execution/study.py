"""Running a study end to end: plan, skip what MLflow already holds, run the rest phase by phase
(pretraining, transfer, fine-tuning search; or a datamodel sweep), summarize.

Fail-fast and the budget end a study early on purpose: no later phase starts, runs it stopped
are KILLED in MLflow, and the next ``run`` of the same study resumes them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datasets_.objstore import is_remote
from datasets_.prepare import publish
from orchestrator.execution.datamodel_sweep import run_datamodels
from orchestrator.execution.packed_phase import run_packed_phase, split_packs
from orchestrator.execution.phase import PhaseContext, Progress
from orchestrator.execution.preflight import checkpoint_exists
from orchestrator.execution.pretrain_phase import run_model, run_pretrain_phase
from orchestrator.execution.ray_connection import ray_session
from orchestrator.execution.search import run_search_phase
from orchestrator.execution.transfer_phase import run_transfer_phase
from orchestrator.planning.plan import StudyPlan, build_plan
from orchestrator.planning.pretrain_runs import PretrainRun
from orchestrator.planning.rerun import Changed, changed_results, is_finished
from orchestrator.records import retry, spool
from orchestrator.records.credentials import mlflow_client_env, split_credentials
from orchestrator.records.lease import StudyLease
from orchestrator.records.provenance import provenance_tags
from orchestrator.records.results import results_table, transfer_frame
from orchestrator.records.retry import TrackingUnavailable, redact
from orchestrator.records.schema import (
    FAILED,
    FINISHED,
    KILLED,
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    RUNNING,
    SPEC_ARTIFACT,
    TAG_CHECKPOINT,
    TAG_CODE_DIGEST,
    TAG_SUPERSEDED_BY,
    VIEW_MASK_ARTIFACT,
)
from orchestrator.records.tracker import (
    Tracker,
    resolve_tracking_uri,
    run_per_config,
    superseded,
    unfinished_reruns,
)
from orchestrator.spec import DEFAULT_STORAGE, SpecError, StudySpec, resolved_document

FAIL_FAST = "the first failed trial (--fail-fast)"


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


def storage_location(given: str | None) -> str:
    """Where checkpoints go: a URI as it is (shared storage), a local folder made absolute."""
    storage = given or DEFAULT_STORAGE
    return storage if is_remote(storage) else str(Path(storage).resolve())


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
        problems.append(
            (
                "resources.workers",
                f"{r.workers} workers x {r.cpus_per_worker:g} CPUs need {need:g} CPUs; "
                f"the Ray cluster has {resources.get('CPU', 0):g}",
            )
        )
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
    verbose: bool = False,
    rerun_changed: bool = False,
) -> StudyOutcome:
    """Run every pretraining run and transfer fit of the study that MLflow does not hold as
    finished (with ``rerun_changed``, also those another code computed:
    :mod:`orchestrator.planning.rerun`); return the outcome.

    No trial starts work once ``spec.budget.max_hours`` have passed since this call (running
    ones finish); with ``fail_fast`` the study stops at the first failed trial. Runs it stops
    are marked KILLED in MLflow and resumed by the next call. ``verbose`` forwards the trials'
    own output (with their node) to this process's.
    """
    t0 = time.monotonic()
    hours = spec.budget.max_hours
    deadline = time.time() + hours * 3600.0 if hours is not None else None
    uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    storage = storage_location(storage_path or spec.storage_path)
    plan = plan or build_plan(spec)
    # The outage deadline is the study's: every process of it reads and writes one clock.
    clock_before = os.environ.get(retry.OUTAGE_CLOCK_ENV)
    os.environ[retry.OUTAGE_CLOCK_ENV] = retry.outage_clock(storage, uri)
    try:
        return _run_study(spec, address, uri, storage, plan, fail_fast, verbose, deadline, t0, rerun_changed)
    finally:
        if clock_before is None:
            os.environ.pop(retry.OUTAGE_CLOCK_ENV, None)
        else:
            os.environ[retry.OUTAGE_CLOCK_ENV] = clock_before


def _run_study(
    spec: StudySpec,
    address: str | None,
    uri: str,
    storage: str,
    plan: StudyPlan,
    fail_fast: bool,
    verbose: bool,
    deadline: float | None,
    t0: float,
    rerun_changed: bool = False,
) -> StudyOutcome:
    provenance = provenance_tags()
    tracker = Tracker(uri, provenance)
    exp = tracker.experiment_id(spec.study)
    retry.reset_outage_clock()  # the store answered: an outage a killed driver left on the clock is over
    # One driver per study, before any run is touched or Ray started (StudyBusy if another holds it).
    with StudyLease(tracker, exp, spec.study) as lease, ray_session(address, verbose=verbose) as embedded:
        import ray

        for warning in check_cluster(spec, ray.cluster_resources(), embedded):
            print(f"warning: {warning} (trials wait until the cluster can hold them)", file=sys.stderr)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        # Credentials in the URI travel with the other secrets, never inside a URI Ray may store.
        worker_uri, uri_credentials = split_credentials(uri)
        tracker.describe_experiment(exp, experiment_note(plan))
        spool.flush(storage, spool.scope(uri, exp), tracker.client)  # metrics an earlier run could not deliver
        ctx = PhaseContext(
            study=spec.study,
            tracking_uri=worker_uri,
            experiment_id=exp,
            storage_path=storage,
            mlflow_env={**mlflow_client_env(), **uri_credentials},
            deadline=deadline,
            fail_fast=fail_fast,
            resources=spec.resources,
            datasets=publish_data(plan, storage),
            provenance=provenance,
        )
        study_run = _study_run(tracker, exp, plan)
        tracker.client.log_text(study_run, yaml.safe_dump(resolved_document(spec), sort_keys=False), SPEC_ARTIFACT)
        if plan.datamodels is not None:
            outcome = _run_datamodels(spec, plan, tracker, study_run, ctx, cpus)
        else:
            outcome = _StudyDriver(spec, plan, tracker, study_run, ctx, cpus, lease, rerun_changed).run()
    outcome.seconds = time.monotonic() - t0
    return outcome


def experiment_note(plan: StudyPlan) -> str:
    """The study's description on its MLflow experiment (markdown): what it asks, its grid, and
    how to read its runs in the UI."""
    spec = plan.spec
    data = "; ".join(f"{name} (`{ref.uri}`)" for name, ref in {**spec.sources, **spec.tasks}.items())
    if plan.datamodels is not None:
        d = spec.datamodels
        grid = (f"a datamodel sweep: {d.num_models} models, each pretrained on a random {d.class_fraction:g} of the "
                f"classes of `{d.source}`, probed on `{d.task}`; the models are rows of the sweep's table (tag "
                "`transferlab.datamodel_table` on the `datamodels` run), not MLflow runs")  # fmt: skip
    else:
        axes = ", ".join(f"{a} {list(v)}" for a, v in spec.pretrain.sweep.items() if len(v) > 1) or "one configuration"
        t = spec.transfer
        grid = (f"{len(plan.pretrain_runs)} pretraining runs ({axes}), each transferred to "
                f"{', '.join(spec.transfer_tasks)} by {', '.join(t.protocol)} at shots {list(t.shots)} "
                f"(few-shot seeds {list(t.seeds)}): {plan.num_transfer_fits} transfer runs")  # fmt: skip
    return (
        f"**transferlab study `{spec.study}`**: how does what a model is pretrained on change how well it "
        f"transfers?\n\nData: {data}.\n\nGrid: {grid}.\n\nHow to read it: runs nest study → pretraining "
        "(`tags.transferlab.kind = 'pretrain'`, metric `upstream_accuracy`) → transfer (`tags.transferlab.kind = "
        "'transfer'`, metric `accuracy` on the task's test split). Every transfer run carries its pretraining "
        "settings as params, so in the runs table filter e.g. `tags.transferlab.kind = 'transfer' and "
        "params.shots = '5'` and show `params.pretrain_size`, `params.label_noise` and `metrics.accuracy`. "
        f"`transferlab report {spec.study}` draws the papers' figures; the study file as it ran is the study "
        f"run's artifact `{SPEC_ARTIFACT}`."
    )


def publish_data(plan: StudyPlan, storage: str) -> dict[str, tuple[str, str]]:
    """Where every node opens each dataset the study reads, with its fingerprint: what the
    driver built in its own cache (builtins, raw-source scans) is copied to ``storage`` first
    (:func:`datasets_.prepare.publish`); trials never open a path of the driver's disk."""
    spec = plan.spec
    if plan.datamodels is not None:
        used = [f"sources.{plan.datamodels.source}", f"tasks.{plan.datamodels.task}"]
    else:
        used = [f"sources.{s}" for s in spec.pretrain.sweep["source"]] + [f"tasks.{t}" for t in spec.transfer_tasks]
    return {key: (publish(plan.data[key], storage), plan.data[key].fingerprint) for key in used}


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
        exp,
        KIND_STUDY,
        spec.study,
        f"study {spec.study}",
        plan.spec_hash,
        {"study": spec.study},
        tags={"transferlab.spec_hash": plan.spec_hash},
    )


def open_pretrain_run(
    tracker: Tracker, exp: str, study: str, run: PretrainRun, prior, study_run: str, source: tuple[str, str]
) -> str:
    """The MLflow run of pretraining job ``run``, ready to train into: ``prior`` (the run an
    interrupted or failed attempt left) reopened, else a new run under ``study_run``. Either way
    its params and class mask are (re)logged: a driver killed between creating a run and logging
    them left a run that analysis would read with defaults (no label noise, every class).
    ``source``: (URI, fingerprint) of its source, logged as the run's dataset input."""
    if prior is not None:
        run_id = prior.info.run_id
        tracker.reopen(run_id)
        tracker.log(run_id, params=run.params)  # only those it lacks: params are immutable
    else:
        run_id = tracker.create_run(
            exp, KIND_PRETRAIN, study, run.run_name, run.config_hash, run.params, parent_run_id=study_run
        )
    if run.view.keep_classes is not None:  # the same content each time: overwriting is harmless
        mask = [c in run.view.keep_classes for c in range(run.num_classes)]
        tracker.client.log_dict(run_id, {"classes": list(run.config.classes), "included": mask}, VIEW_MASK_ARTIFACT)
    uri, fingerprint = source
    tracker.log_inputs(run_id, [(run.source, fingerprint, redact(uri), "training")])
    return run_id


def resume_targets(runs: list, redo: frozenset[str]) -> dict[str, object]:
    """config_hash -> the run that a job to do trains into, where there is one: the run that
    stands for the job if it did not finish; for a finished job in ``redo`` (computed again),
    the recomputation an earlier driver left unfinished — never the finished run itself."""
    out = {h: r for h, r in run_per_config(runs).items() if not is_finished(r)}
    reruns = unfinished_reruns(runs)
    out.update({h: reruns[h] for h in redo if h in reruns})
    return out


def _next_step(tracker: Tracker, run_id: str, metric: str) -> int:
    """One step per ``run`` of the study: how many times ``metric`` was logged before."""
    return len(tracker.client.get_metric_history(run_id, metric))


def _close_study_run(tracker: Tracker, study_run: str, status: str, counts: dict, step: int) -> None:
    """This ``run``'s counts at its step (so the study run shows how the study grew), then its status."""
    tracker.log(study_run, metrics=counts, step=step)
    tracker.finish(study_run, status)


def _budget_line(spec: StudySpec, not_launched: int, what: str = "trial(s)") -> str:
    return f"budget.max_hours ({spec.budget.max_hours:g} h) reached; {not_launched} {what} not launched"


@dataclass
class _Tally:
    """What this ``run`` did so far, phase by phase."""

    failed: list[str] = field(default_factory=list)
    not_launched: int = 0  # trials that never started work (budget.max_hours)
    transfer_ran: int = 0
    features: dict = field(default_factory=lambda: {"feature_extractions": 0, "feature_cache_hits": 0})

    def add(self, progress: Progress) -> None:
        self.failed += progress.errors
        self.not_launched += progress.total - progress.done - progress.failed
        for k in self.features:
            self.features[k] += sum(int(r.get(k, 0)) for r in progress.results)


class _StudyDriver:
    """One ``run`` of an ordinary study: its pretraining runs, then their transfer fits, then
    the searched fine-tuning fits."""

    def __init__(
        self,
        spec: StudySpec,
        plan: StudyPlan,
        tracker: Tracker,
        study_run: str,
        ctx: PhaseContext,
        cpus: float,
        lease: StudyLease,
        rerun_changed: bool = False,
    ):
        self.spec, self.plan, self.tracker, self.study_run, self.ctx, self.cpus = (
            spec,
            plan,
            tracker,
            study_run,
            ctx,
            cpus,
        )
        self.lease = lease
        self.rerun_changed = rerun_changed
        self.exp = ctx.experiment_id
        self.names = {r.config_hash: r.run_name for r in plan.pretrain_runs}
        self.tally = _Tally()

    def run(self) -> StudyOutcome:
        tracker, plan, spec = self.tracker, self.plan, self.spec
        todo = self._open_pretrain_runs()
        step = _next_step(tracker, self.study_run, "pretrain_runs")
        on_counts = _progress_logger(tracker, self.study_run, step)
        status, crash = FAILED, None
        try:
            self._run_phases(todo, on_counts)
            self._tag_superseded()
            spool.flush(self.ctx.storage_path, spool.scope(tracker.uri, self.exp), tracker.client)
            status = FINISHED if not self.tally.failed else FAILED
        except BaseException as e:
            crash = e
            raise
        finally:
            stopped = FAIL_FAST if self.ctx.fail_fast and self.tally.failed else None
            if stopped is None and self.tally.not_launched and self.ctx.past_deadline():
                stopped, status = _budget_line(spec, self.tally.not_launched), KILLED
            # After an outage the next `run` settles them; after a lost lease they are the new holder's.
            if not isinstance(crash, TrackingUnavailable) and not self.lease.lost:
                self._kill_leftovers()
            _close_study_run(tracker, self.study_run, status, self._counts(), step)
        return StudyOutcome(
            self.study_run,
            len(plan.pretrain_runs),
            len(todo),
            plan.num_transfer_fits,
            self.tally.transfer_ran,
            self.tally.failed,
            results_table(transfer_frame(tracker, spec.study)),
            0.0,
            stopped=stopped,
        )

    def _run_phases(self, todo: list, on_counts) -> None:
        """The phases in order; a failure with --fail-fast, or the deadline, ends them early."""
        ctx, tally = self.ctx, self.tally
        packs, alone = split_packs(ctx, self.spec, todo, self.cpus)
        if packs:
            retry.check_outage(ctx.tracking_uri)
            tally.add(run_packed_phase(ctx, packs, self.cpus, on_counts))
        if tally.failed and ctx.fail_fast:
            return
        if alone:
            retry.check_outage(ctx.tracking_uri)
            tally.add(run_pretrain_phase(ctx, alone, self.cpus, on_counts))
        if tally.failed and ctx.fail_fast:
            return
        labels, searches = self._schedule_transfer()
        if (labels or searches) and ctx.past_deadline():
            tally.not_launched += len(labels) + len(searches)
            tally.transfer_ran = 0
            return
        if labels:
            retry.check_outage(ctx.tracking_uri)
            tally.add(run_transfer_phase(ctx, labels, self.cpus, on_counts))
        if searches and not (tally.failed and ctx.fail_fast):
            retry.check_outage(ctx.tracking_uri)
            tally.add(run_search_phase(ctx, searches, self.cpus, on_counts))

    def _open_pretrain_runs(self) -> list:
        """The pretraining runs still to do, each with its MLflow run (reopened or created); the
        runs an interrupted driver left behind that this one will not resume are settled."""
        tracker, exp, plan, ctx = self.tracker, self.exp, self.plan, self.ctx
        pre_all, fits_all = tracker.runs(exp, KIND_PRETRAIN), tracker.runs(exp, KIND_TRANSFER)
        pre_runs, all_fits = run_per_config(pre_all), run_per_config(fits_all)
        changed = self._changed(pre_runs, all_fits)
        pre_prior, fit_prior = resume_targets(pre_all, changed.pretrain), resume_targets(fits_all, changed.transfer)
        todo = [
            r
            for r in plan.pretrain_runs
            if not is_finished(pre_runs.get(r.config_hash)) or r.config_hash in changed.pretrain
        ]
        done_fits = {h for h, r in all_fits.items() if is_finished(r)} - changed.transfer
        planned = {r.config_hash for r in todo} | {f.config_hash for g in plan.transfer_groups for f in g.fits}
        reopened = {r.info.run_id for h, r in {**pre_prior, **fit_prior}.items() if h in planned}
        self._settle_orphans(reopened)
        todo_fits = sum(1 for g in plan.transfer_groups for f in g.fits if f.config_hash not in done_fits)
        again = (
            f"; --rerun-changed: {len(changed.pretrain)} pretraining run(s) and {len(changed.transfer)} transfer "
            "fit(s) computed by other code are computed again"
            if self.rerun_changed
            else ""
        )
        print(
            f"study '{self.spec.study}': {len(plan.pretrain_runs)} pretraining runs "
            f"({len(plan.pretrain_runs) - len(todo)} already "
            f"done), {plan.num_transfer_fits} transfer fits ({plan.num_transfer_fits - todo_fits} already done)"
            f"{again}\n"
            f"tracking: {redact(tracker.uri)}   experiment: {self.spec.study}   storage: {redact(ctx.storage_path)}",
            flush=True,
        )
        for run in todo:
            run_id = open_pretrain_run(
                tracker,
                exp,
                self.spec.study,
                run,
                pre_prior.get(run.config_hash),
                self.study_run,
                ctx.datasets[f"sources.{run.source}"],
            )
            ctx.run_ids[run.config_hash] = run_id
            ctx.pretrain_runs[run.config_hash] = run
        return todo

    def _schedule_transfer(self) -> tuple[dict[str, str], dict[str, str]]:
        """The transfer trials (group key -> label) and searched fits (fit hash -> label) still
        to run, with what their trials need put into the context. Fits whose checkpoint is
        gone fail here, with how to redo their pretraining."""
        tracker, ctx, names = self.tracker, self.ctx, self.names
        pre_runs = tracker.runs_by_hash(self.exp, KIND_PRETRAIN)
        fits_all = tracker.runs(self.exp, KIND_TRANSFER)
        transfer_runs = run_per_config(fits_all)
        # Read again after the pretraining phase: fits of a pretraining run computed again now
        # have another parent than the run that stands for their pretraining.
        changed = self._changed(pre_runs, transfer_runs)
        prior = resume_targets(fits_all, changed.transfer)
        missing: set[str] = set()  # pretraining runs whose checkpoint is gone (said once each)
        labels, searches = {}, {}
        for g in self.plan.transfer_groups:
            pre = pre_runs.get(g.pretrain_hash)
            fits = tuple(
                f
                for f in g.fits
                if not is_finished(transfer_runs.get(f.config_hash)) or f.config_hash in changed.transfer
            )
            # A pretraining run still from other code (its recomputation failed): its fits wait for it.
            if not fits or not is_finished(pre) or g.pretrain_hash in changed.pretrain:
                continue
            checkpoint = pre.data.tags.get(TAG_CHECKPOINT, "")
            if not checkpoint_exists(checkpoint):
                # Chosen behaviour: fail these fits and say how to redo the pretraining, rather
                # than silently retraining a model other finished fits were computed from.
                if pre.info.run_id not in missing:
                    print(
                        f"error: checkpoint of pretraining run '{names[g.pretrain_hash]}' (run {pre.info.run_id}) is "
                        "missing: "
                        f"{checkpoint or '(no checkpoint recorded)'}; the transfer fits that need it were not run. "
                        f"To redo that pretraining, delete the run (mlflow runs delete --run-id {pre.info.run_id}) "
                        f"and run the same command again",
                        file=sys.stderr,
                        flush=True,
                    )
                    missing.add(pre.info.run_id)
                self.tally.failed.append(f"{names[g.pretrain_hash]} -> {g.task} (missing checkpoint)")
                continue
            key = f"{g.pretrain_hash}:{g.task}"
            ctx.run_ids[g.pretrain_hash] = pre.info.run_id
            ctx.checkpoints[g.pretrain_hash] = checkpoint
            if g.pretrain_hash not in ctx.models:
                ctx.models[g.pretrain_hash] = run_model(tracker, self.exp, pre, checkpoint)
            for f in fits:
                if f.config_hash in prior:  # an earlier attempt left it unfinished
                    ctx.run_ids[f.config_hash] = prior[f.config_hash].info.run_id
                if g.searched(f):  # tuned by its own Tune search, in the phase after this one
                    ctx.searches[f.config_hash] = (g, f)
                    searches[f.config_hash] = f"{names[g.pretrain_hash]} -> {f.run_name}"
            plain = tuple(f for f in fits if not g.searched(f))
            if plain:
                ctx.transfer_groups[key] = dataclasses.replace(g, fits=plain)
                labels[key] = f"{names[g.pretrain_hash]} -> {g.task} ({len(plain)} fits)"
            self.tally.transfer_ran += len(fits)
        return labels, searches

    def _changed(self, pre_runs: dict, transfer_runs: dict) -> Changed:
        """What ``--rerun-changed`` computes again (nothing without it)."""
        if not self.rerun_changed:
            return Changed()
        return changed_results(self.plan, pre_runs, transfer_runs, self.ctx.provenance.get(TAG_CODE_DIGEST, ""))

    def _tag_superseded(self) -> None:
        """Tag every FINISHED run that a newer FINISHED run of its job replaced (run --rerun-changed)."""
        for kind in (KIND_PRETRAIN, KIND_TRANSFER):
            for run_id, standing in superseded(self.tracker.runs(self.exp, kind)).items():
                self.tracker.log(run_id, tags={TAG_SUPERSEDED_BY: standing})

    def _settle_orphans(self, keep: set[str]) -> None:
        """Mark FAILED the runs an earlier, killed driver left RUNNING that this run will not reopen
        (superseded by a finished run of the same config, or no longer in the grid)."""
        for kind in (KIND_PRETRAIN, KIND_TRANSFER):
            for r in self.tracker.runs(self.exp, kind):
                if r.info.status == RUNNING and r.info.run_id not in keep:
                    print(
                        f"note: run {r.info.run_id} ('{r.info.run_name}') was left RUNNING by an interrupted driver "
                        f"and is not resumed by this run; marked FAILED",
                        flush=True,
                    )
                    self.tracker.finish(r.info.run_id, FAILED)

    def _kill_leftovers(self) -> None:
        """Runs still RUNNING when this driver is done were stopped by it (budget, fail-fast, an
        exception): KILLED, so no run stays RUNNING; the next ``run`` reopens them."""
        for kind in (KIND_PRETRAIN, KIND_TRANSFER):
            for r in self.tracker.runs(self.exp, kind):
                if r.info.status == RUNNING:
                    self.tracker.finish(r.info.run_id, KILLED)

    def _counts(self) -> dict:
        tracker, exp = self.tracker, self.exp
        return {
            "pretrain_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_PRETRAIN).values() if is_finished(r)),
            "transfer_runs": sum(1 for r in tracker.runs_by_hash(exp, KIND_TRANSFER).values() if is_finished(r)),
            "failed_runs": len(self.tally.failed),
            # This invocation's transfer work: fits run, and how their frozen features were had.
            "transfer_fits_run": self.tally.transfer_ran,
            **self.tally.features,
        }


def _progress_logger(tracker: Tracker, run_id: str, step: int):
    """Log a phase's live trial counts on the study run; best effort, without retries, so that
    a slow tracking server never stalls Tune's event loop (the final counts are logged after)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)

    def log(counts: dict) -> None:
        try:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in counts.items()])
        except Exception as e:
            print(f"warning: could not log progress on the study run: {type(e).__name__}", file=sys.stderr)

    return log


def _run_datamodels(
    spec: StudySpec, plan: StudyPlan, tracker: Tracker, study_run: str, ctx: PhaseContext, cpus: float
) -> StudyOutcome:
    status, stopped = FAILED, None
    try:
        dm = run_datamodels(spec, plan.datamodels, tracker, study_run, ctx, cpus)
        status = FINISHED if not dm.failed and dm.done == dm.total else FAILED
        if dm.not_launched and not dm.failed:
            stopped, status = _budget_line(spec, dm.not_launched, "datamodel trial(s)"), KILLED
    finally:
        _close_study_run(
            tracker,
            study_run,
            status,
            {"failed_runs": 0 if status == FINISHED else 1},
            _next_step(tracker, study_run, "failed_runs"),
        )
    failed = [f"datamodels trial {x}" for x in dm.failed]
    return StudyOutcome(study_run, 0, 0, 0, 0, failed, "", 0.0, summary=dm.summary(), stopped=stopped)
