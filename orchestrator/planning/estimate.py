"""What a ``transferlab run`` would do, before it does it: the DAG summary, trial counts, a wall
time estimate, and the study's budget (``budget.max_trials``, ``budget.max_hours``).

Nothing here starts Ray or writes to MLflow or storage: MLflow is only searched, and a sqlite
store that does not exist yet is an empty store (opening it would create the file).

Cost model (deliberately simple; it says what it assumes):

- A ``run`` costs ``STARTUP_S`` (Ray start, Tune set-up) if it launches anything.
- A pretraining run costs ``PRETRAIN_OVERHEAD_S`` (TorchTrainer start-up and teardown, Ray Data
  start) plus ``PRETRAIN_S_PER_SAMPLE_EPOCH`` per training sample and epoch, scaled by the pixel
  count relative to 32x32. The per-sample figure is a CPU figure for the small CNNs; the held-out
  evaluation, model size and GPUs are not modelled.
- A packed pretraining trial (``pretrain.pack``, :mod:`orchestrator.planning.packs`) costs
  ``PACK_OVERHEAD_S`` (trial start, decoding the source's training split) plus the per-sample
  term of each of its runs: stacking saves the start-ups, not the arithmetic. Packed runs log
  their share of the pack's seconds and ``pack_size``; the calibration leaves them out (it
  calibrates the TorchTrainer runs' model). Packed trials hold ``resources.cpus_per_worker`` CPUs
  each and run on :func:`pack_concurrency` slots, after the TorchTrainer runs (GPU shares are
  not modelled).
- A transfer trial (one pretraining checkpoint x one task) costs ``TRANSFER_OVERHEAD_S`` (trial
  start, checkpoint load, feature extraction) plus, per fit, ``FROZEN_FIT_S`` for the closed-form
  probes or ``FINETUNE_S_PER_STEP`` per step and learning rate for finetune / lp_ft.
- A searched finetune / lp_ft fit (``transfer.finetune.search``) launches ``num_samples`` Tune
  trials of ``SEARCH_TRIAL_OVERHEAD_S`` plus ``FINETUNE_S_PER_STEP`` per step each (every trial
  at full length: ASHA's early stops make it shorter), on the search's concurrency, then retrains
  the chosen config once at the same cost; fits are searched one after the other. Not calibrated.
- Finished runs of the same kind in the study's MLflow experiment that recorded
  ``trial_seconds`` calibrate these defaults: every default estimate is multiplied by the median
  ratio of measured to default-estimated seconds over those runs (one factor per kind).
- Trials of a phase run in grid order on ``concurrency`` slots (Tune's ``max_concurrent_trials``);
  the wall time of a phase is when its last trial would end; phases run one after the other.
  Without a cluster at hand the concurrency is that of the private local Ray ``run`` would start
  here, unless ``resources.max_concurrent_trials`` says otherwise.
"""

from __future__ import annotations

import heapq
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.planning.packs import plan_packs
from orchestrator.planning.plan import StudyPlan
from orchestrator.planning.rerun import Changed, changed_results
from orchestrator.planning.transfer_fits import TransferGroup
from orchestrator.records.provenance import code_digest
from orchestrator.records.schema import (
    FINISHED,
    KIND_PRETRAIN,
    KIND_TRANSFER,
    METRIC_PACK_SIZE,
    METRIC_TRIAL_SECONDS,
    TAG_CODE_DIGEST,
    TAG_PARENT,
)
from orchestrator.records.tracker import Tracker
from orchestrator.spec import Resources, SpecError, StudySpec
from trainers.protocols import FINETUNE_PROTOCOLS
from trainers.transfer import FinetuneSettings

# Defaults measured on a 2-core CPU machine with the quickstart study (README, Measured).
STARTUP_S = 10.0
PRETRAIN_OVERHEAD_S = 25.0
PRETRAIN_S_PER_SAMPLE_EPOCH = 0.008
TRANSFER_OVERHEAD_S = 10.0
FROZEN_FIT_S = 0.3
FINETUNE_S_PER_STEP = 0.01
SEARCH_TRIAL_OVERHEAD_S = 3.0
PACK_OVERHEAD_S = 5.0


@dataclass
class MlflowState:
    """The study's runs in MLflow by config hash (empty for a study never run)."""

    pretrain: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)


def read_state(uri: str, study: str) -> MlflowState:
    """Search (never write) the study's pretraining and transfer runs."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return MlflowState()
    tracker = Tracker(uri)
    exp = tracker.experiment_id(study, create=False)
    if exp is None:
        return MlflowState()
    return MlflowState(tracker.runs_by_hash(exp, KIND_PRETRAIN), tracker.runs_by_hash(exp, KIND_TRANSFER))


def default_pretrain_seconds(image_size: int, epochs: int, num_train_samples: int) -> float:
    pixels = (image_size / 32.0) ** 2
    return PRETRAIN_OVERHEAD_S + PRETRAIN_S_PER_SAMPLE_EPOCH * pixels * num_train_samples * epochs


def _fit_seconds(protocol: str, finetune: FinetuneSettings) -> float:
    if protocol in FINETUNE_PROTOCOLS:
        return FINETUNE_S_PER_STEP * finetune.steps * len(finetune.lr)
    return FROZEN_FIT_S


def default_transfer_seconds(protocols: list[str], finetune: FinetuneSettings) -> float:
    return TRANSFER_OVERHEAD_S + sum(_fit_seconds(p, finetune) for p in protocols)


def _median_ratio(pairs: list[tuple[float, float]]) -> float | None:
    ratios = [measured / predicted for measured, predicted in pairs if predicted > 0 and measured > 0]
    return statistics.median(ratios) if ratios else None


def calibration(state: MlflowState) -> dict[str, tuple[float, int]]:
    """kind -> (factor on the default estimate, finished runs it rests on); factor 1 without history."""
    pre = []
    for r in state.pretrain.values():
        m, p = r.data.metrics, r.data.params
        packed = METRIC_PACK_SIZE in m
        if r.info.status == FINISHED and METRIC_TRIAL_SECONDS in m and "num_train_samples" in m and not packed:
            try:
                image_size, epochs = int(p["image_size"]), int(p["epochs"])
            except (KeyError, ValueError):
                continue
            pre.append(
                (m[METRIC_TRIAL_SECONDS], default_pretrain_seconds(image_size, epochs, int(m["num_train_samples"])))
            )
    # Transfer runs of one trial share its trial_seconds: group them back into trials.
    trials: dict[tuple, list[str]] = {}
    for r in state.transfer.values():
        m = r.data.metrics
        if r.info.status == FINISHED and METRIC_TRIAL_SECONDS in m:
            key = (r.data.tags.get(TAG_PARENT), r.data.params.get("task"), m[METRIC_TRIAL_SECONDS])
            trials.setdefault(key, []).append(r.data.params.get("protocol", "linear_probe"))
    finetune = FinetuneSettings()  # the runs' own settings are not read back: defaults suffice here
    tra = [(key[2], default_transfer_seconds(protocols, finetune)) for key, protocols in trials.items()]
    out = {}
    for kind, pairs in ((KIND_PRETRAIN, pre), (KIND_TRANSFER, tra)):
        factor = _median_ratio(pairs)
        out[kind] = (factor, len(pairs)) if factor is not None else (1.0, 0)
    return out


def pretrain_concurrency(resources: Resources, cluster_cpus: float) -> int:
    """Concurrent pretraining trials that leave at least one CPU per trial for Ray Data ingest."""
    if resources.max_concurrent_trials:
        return resources.max_concurrent_trials
    per_trial = resources.workers * resources.cpus_per_worker + 1.0
    return max(1, int(math.floor(cluster_cpus / per_trial)))


def pack_concurrency(resources: Resources, cluster_cpus: float) -> int:
    """Concurrent packed pretraining trials: each holds ``cpus_per_worker`` CPUs and computes in
    the trial itself."""
    if resources.max_concurrent_trials:
        return resources.max_concurrent_trials
    return max(1, int(math.floor(cluster_cpus / resources.cpus_per_worker + 1e-9)))


def transfer_concurrency(
    cluster_cpus: float, resources: Resources | None = None, cluster_gpus: float | None = None
) -> int:
    """Concurrent transfer trials: one CPU each, and with GPUs their share of one
    (``resources.light_trial_gpus``); the GPU count is unknown (None) when planning offline."""
    if resources is None or not resources.use_gpu or cluster_gpus is None:
        return max(1, int(cluster_cpus))
    return resources.light_concurrency({"CPU": cluster_cpus, "GPU": cluster_gpus})


def phase_seconds(durations: list[float], concurrency: int) -> float:
    """When the last of ``durations`` ends, started in order on ``concurrency`` slots."""
    slots = [0.0] * max(1, min(concurrency, len(durations) or 1))
    end = 0.0
    for d in durations:
        start = heapq.heappop(slots)
        end = max(end, start + d)
        heapq.heappush(slots, start + d)
    return end


@dataclass
class PlanSummary:
    """What ``transferlab run`` would do now (see :func:`summarize`)."""

    study: str
    pretrain_jobs: int
    pretrain_cached: int  # a FINISHED run with the job's hash exists
    pretrain_resume: int  # a run exists but did not finish: it is reopened (from its checkpoint)
    pretrain_new: int
    pretrain_rerun: int  # finished by other code, computed again (run --rerun-changed)
    transfer_fits: int
    transfer_cached: int
    transfer_todo: int
    transfer_rerun: int  # of transfer_todo: finished by other code or from a pretraining computed again
    pretrain_trials: int
    transfer_trials: int
    pretrain_concurrency: int
    transfer_concurrency: int
    pretrain_seconds: float
    transfer_seconds: float
    calibrated_on: dict[str, int]  # kind -> finished runs the cost model was calibrated on
    jobs: list[dict]  # one entry per pretraining job: name, status, estimate, transfer fits
    search_fits: int = 0  # finetune / lp_ft fits still to search (transfer.finetune.search)
    search_trials: int = 0  # their Tune trials, num_samples each
    search_seconds: float = 0.0
    packed_runs: int = 0  # pending pretraining runs trained several per trial (pretrain.pack)
    packs: int = 0  # the trials they take
    pack_concurrency: int = 1
    # Cached (FINISHED) runs of this plan whose code digest is not today's: computed by other code
    # (or by a version that did not record it), and reused as they are.
    cached_other_code: int = 0
    code_digest: str = ""

    @property
    def trials(self) -> int:
        return self.pretrain_trials + self.transfer_trials + self.search_trials

    @property
    def seconds(self) -> float:
        return (STARTUP_S if self.trials else 0.0) + self.pretrain_seconds + self.transfer_seconds + self.search_seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "trials": self.trials, "seconds": self.seconds}


def job_status(run, rerun: bool = False) -> str:
    """new, resume (a run exists, unfinished), cached (finished), or rerun (finished by other
    code, computed again by ``run --rerun-changed``)."""
    if run is None:
        return "new"
    if run.info.status != FINISHED:
        return "resume"
    return "rerun" if rerun else "cached"


def default_cluster_cpus() -> float:
    """Logical CPUs of the private local Ray that ``run`` starts here (execution.ray_connection)."""
    return float(2 * (os.cpu_count() or 1))


def summarize(
    plan: StudyPlan, state: MlflowState, cluster_cpus: float | None = None, rerun_changed: bool = False
) -> PlanSummary:
    """The DAG of ``plan`` against what MLflow holds: counts, trials, estimated seconds; with
    ``rerun_changed``, results another code computed count as to run (``run --rerun-changed``)."""
    cpus = cluster_cpus or default_cluster_cpus()
    cal = calibration(state)
    pre_factor, tra_factor = cal[KIND_PRETRAIN][0], cal[KIND_TRANSFER][0]
    digest = code_digest()
    changed = changed_results(plan, state.pretrain, state.transfer, digest) if rerun_changed else Changed()
    done_fits = {h for h, r in state.transfer.items() if r.info.status == FINISHED} - changed.transfer
    groups: dict[str, list[TransferGroup]] = {}
    for g in plan.transfer_groups:
        groups.setdefault(g.pretrain_hash, []).append(g)
    jobs, tra_durations, searches = [], [], []
    pc, tc = pretrain_concurrency(plan.spec.resources, cpus), transfer_concurrency(cpus)
    statuses = {
        r.config_hash: job_status(state.pretrain.get(r.config_hash), r.config_hash in changed.pretrain)
        for r in plan.pretrain_runs
    }
    pending = [r for r in plan.pretrain_runs if statuses[r.config_hash] != "cached"]
    samples = {s: plan.data[f"sources.{s}"].num_samples("train") for s in {r.source for r in pending}}
    kc = pack_concurrency(plan.spec.resources, cpus)
    packs, alone = plan_packs(pending, plan.spec.pretrain.pack, plan.spec.resources.workers, samples, kc)
    compute = {
        r.config_hash: default_pretrain_seconds(r.settings.image_size, r.settings.epochs, r.num_train_samples)
        - PRETRAIN_OVERHEAD_S
        for r in pending
    }
    seconds_of = {r.config_hash: (compute[r.config_hash] + PRETRAIN_OVERHEAD_S) * pre_factor for r in alone}
    pre_durations, pack_durations = list(seconds_of.values()), []
    for p in packs:
        pack_durations.append(PACK_OVERHEAD_S + sum(compute[r.config_hash] for r in p.runs))
        seconds_of |= {r.config_hash: PACK_OVERHEAD_S / len(p.runs) + compute[r.config_hash] for r in p.runs}
    for run in plan.pretrain_runs:
        status = statuses[run.config_hash]
        seconds = seconds_of.get(run.config_hash, 0.0)
        fits = {}
        for g in groups.get(run.config_hash, []):
            todo = [f for f in g.fits if f.config_hash not in done_fits]
            fits[g.task] = {"fits": len(g.fits), "to_run": len(todo)}
            plain = [f for f in todo if not g.searched(f)]
            if plain:
                tra_durations.append(
                    default_transfer_seconds([f.protocol for f in plain], g.config.finetune) * tra_factor
                )
            for _ in range(len(todo) - len(plain)):
                searches.append(search_estimate(g, cpus))
        jobs.append(
            {
                "name": run.run_name,
                "config_hash": run.config_hash,
                "status": status,
                "seconds": seconds,
                "transfer": fits,
            }
        )
    statuses = [j["status"] for j in jobs]
    planned = {r.config_hash for r in plan.pretrain_runs} | {
        f.config_hash for g in plan.transfer_groups for f in g.fits
    }
    again = changed.pretrain | changed.transfer
    cached = [
        r
        for h, r in {**state.pretrain, **state.transfer}.items()
        if h in planned and h not in again and r.info.status == FINISHED
    ]
    other_code = sum(r.data.tags.get(TAG_CODE_DIGEST) != digest for r in cached)
    todo_fits = sum(1 for g in plan.transfer_groups for f in g.fits if f.config_hash not in done_fits)
    return PlanSummary(
        study=plan.spec.study,
        pretrain_jobs=len(jobs),
        pretrain_cached=statuses.count("cached"),
        pretrain_resume=statuses.count("resume"),
        pretrain_new=statuses.count("new"),
        pretrain_rerun=statuses.count("rerun"),
        transfer_rerun=len(changed.transfer),
        transfer_fits=plan.num_transfer_fits,
        transfer_cached=plan.num_transfer_fits - todo_fits,
        transfer_todo=todo_fits,
        pretrain_trials=len(pre_durations) + len(pack_durations),
        transfer_trials=len(tra_durations),
        pretrain_concurrency=pc,
        transfer_concurrency=tc,
        pretrain_seconds=phase_seconds(pre_durations, pc) + phase_seconds(pack_durations, kc),
        transfer_seconds=phase_seconds(tra_durations, tc),
        calibrated_on={k: n for k, (_, n) in cal.items()},
        jobs=jobs,
        search_fits=len(searches),
        search_trials=sum(n for n, _ in searches),
        search_seconds=sum(seconds for _, seconds in searches),
        cached_other_code=other_code,
        code_digest=digest,
        packed_runs=sum(len(p.runs) for p in packs),
        packs=len(packs),
        pack_concurrency=kc,
    )


def search_estimate(group: TransferGroup, cluster_cpus: float) -> tuple[int, float]:
    """(Tune trials, seconds) of one searched fit of ``group``: its trials on the search's
    concurrency, then the retraining of the chosen config."""
    s = group.search
    trial = SEARCH_TRIAL_OVERHEAD_S + FINETUNE_S_PER_STEP * group.config.finetune.steps
    slots = s.max_concurrent_trials or transfer_concurrency(cluster_cpus)
    return s.num_samples, phase_seconds([trial] * s.num_samples, slots) + trial


def check_budget(spec: StudySpec, summary: PlanSummary) -> None:
    """Raise a :class:`SpecError` naming the budget field a study exceeds, and by how much."""
    b = spec.budget
    if b.max_trials is not None and summary.trials > b.max_trials:
        raise SpecError(
            "budget.max_trials",
            f"the study would launch {summary.trials} Tune trials "
            f"({summary.pretrain_trials} pretraining, {summary.transfer_trials} transfer"
            + (f", {summary.search_trials} fine-tuning search" if summary.search_trials else "")
            + "), "
            f"{summary.trials - b.max_trials} over the budget of {b.max_trials}",
        )
    hours = summary.seconds / 3600.0
    if b.max_hours is not None and hours > b.max_hours:
        raise SpecError(
            "budget.max_hours",
            f"the study is estimated at {hours:.3g} h of wall time, "
            f"{hours - b.max_hours:.3g} h over the budget of {b.max_hours:g} h (see `transferlab plan`)",
        )


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def format_summary(s: PlanSummary, spec: StudySpec, uri: str) -> str:
    """The human-readable plan, as ``transferlab plan`` prints it."""
    lines = [f"plan of study '{s.study}' against {uri} (nothing is run or written)"]
    for j in s.jobs:
        tasks = ", ".join(f"{t}: {v['to_run']}/{v['fits']} fits to run" for t, v in j["transfer"].items())
        est = f"~{duration(j['seconds'])}" if j["status"] != "cached" else ""
        lines.append(f"  {j['status']:<7} {j['name']:<45} {est:<12} {tasks}")
    lines += [
        f"pretraining runs: {s.pretrain_jobs}: {s.pretrain_new} to run, {s.pretrain_resume} interrupted (resume), "
        + (f"{s.pretrain_rerun} computed by other code (rerun), " if s.pretrain_rerun else "")
        + f"{s.pretrain_cached} finished (cached)"
        + (
            f"; {s.packed_runs} of them packed into {s.packs} trial(s) (pretrain.pack, up to "
            f"{s.pack_concurrency} at a time)"
            if s.packs
            else ""
        ),
        f"transfer fits:    {s.transfer_fits}: {s.transfer_todo} to run"
        + (f" ({s.transfer_rerun} computed again: other code, or their pretraining is)" if s.transfer_rerun else "")
        + f", {s.transfer_cached} finished (cached)",
        f"Tune trials:      {s.trials} ({s.pretrain_trials} pretraining, up to {s.pretrain_concurrency} at a time; "
        f"{s.transfer_trials} transfer, up to {s.transfer_concurrency} at a time"
        + (f"; {s.search_trials} fine-tuning search trials for {s.search_fits} fit(s)" if s.search_fits else "")
        + ")",
        f"estimated wall time: {duration(s.seconds)} (pretraining {duration(s.pretrain_seconds)}, transfer "
        f"{duration(s.transfer_seconds)}, "
        + (f"search {duration(s.search_seconds)}, " if s.search_fits else "")
        + f"start-up {duration(STARTUP_S if s.trials else 0)}); cost model "
        + (
            "calibrated on " + ", ".join(f"{n} finished {k} run(s)" for k, n in s.calibrated_on.items() if n)
            if any(s.calibrated_on.values())
            else "defaults (no finished runs with timings yet)"
        ),
    ]
    if s.cached_other_code:
        lines.append(
            f"note: {s.cached_other_code} cached result(s) were computed by other code than today's (code digest "
            f"{s.code_digest} of trainers/ and datasets_/) and are reused as they are; `transferlab run "
            "--rerun-changed` computes them again (and the transfer fits of a pretraining run it computes again), "
            "keeping the old runs, tagged transferlab.superseded_by"
        )
    b = spec.budget
    if b.max_trials is not None or b.max_hours is not None:
        parts = ([f"max_trials {b.max_trials}"] if b.max_trials is not None else []) + (
            [f"max_hours {b.max_hours:g}"] if b.max_hours is not None else []
        )
        lines.append(f"budget: {', '.join(parts)}")
    return "\n".join(lines)
