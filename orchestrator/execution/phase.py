"""The Ray Tune phase runner every phase of a study uses: what a trial is handed
(:class:`TrialContext`), one Tune grid per phase (:func:`run_phase`) and its live progress
(:class:`Progress`: a line per trial start, report and end, with counts and an ETA)."""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from datasets_ import DatasetError, ShardedDataset, open_dataset
from orchestrator.planning.pretrain_runs import PretrainRun
from orchestrator.planning.transfer_fits import TransferFit, TransferGroup
from orchestrator.records.credentials import apply_mlflow_client_env
from orchestrator.records.retry import check_outage, redact
from orchestrator.records.tracker import Tracker
from orchestrator.spec import Resources

# What a trial returns when it started after the study's budget.max_hours deadline: it did
# nothing, and the study counts it as not launched.
NOT_LAUNCHED = "not_launched"


@dataclass(kw_only=True)
class TrialContext:
    """What every trial of a phase needs, shipped once through Ray's object store."""

    study: str
    tracking_uri: str  # without credentials: those are in mlflow_env
    experiment_id: str
    storage_path: str
    # MLflow credentials/TLS settings of the driver (records.credentials.MLFLOW_CLIENT_ENV);
    # secrets, so kept out of the repr (and out of Tune's param_space, which is saved to disk).
    mlflow_env: dict[str, str] = field(default_factory=dict, repr=False)
    deadline: float | None = None  # time.time() after which no trial starts work (budget.max_hours)
    fail_fast: bool = False  # stop the phase at its first failed trial
    # "sources.NAME" / "tasks.NAME" -> (where every node opens it, its fingerprint in the plan)
    datasets: dict[str, tuple[str, str]] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)  # tags on every run (records.provenance)

    def tracker(self) -> Tracker:
        """The trial's MLflow writer: the driver's tracking URI, its provenance tags on new runs."""
        return Tracker(self.tracking_uri, self.provenance)

    def open_data(self, key: str) -> ShardedDataset:
        """Dataset ``key`` as the plan saw it, opened wherever this trial runs; a one-line
        :class:`DatasetError` naming its URI and this node if it is not there or has changed."""
        uri, fingerprint = self.datasets[key]
        try:
            ds = open_dataset(uri)
        except DatasetError as e:
            raise DatasetError(f"{e} (on node {node_name()})") from None
        if ds.fingerprint != fingerprint:
            raise DatasetError(
                f"{uri}: fingerprint {ds.fingerprint} on node {node_name()}, but the plan's is "
                f"{fingerprint}: the dataset changed since the study was planned; run it again"
            )
        return ds

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def begin_trial(self) -> bool:
        """A trial's first step: False once ``budget.max_hours`` has passed (the trial must then
        return ``{NOT_LAUNCHED: 1}`` without doing anything); else the driver's MLflow
        credentials are applied to this worker and the trial goes on, unless the study's
        tracking outage is past its deadline (:class:`~orchestrator.records.retry.TrackingUnavailable`)."""
        if self.past_deadline():
            return False
        apply_mlflow_client_env(self.mlflow_env)
        check_outage(self.tracking_uri)  # a trial started late in an outage gives up at once
        return True


@dataclass(kw_only=True)
class PhaseContext(TrialContext):
    """What the trials of a study's pretraining, transfer and search phases need."""

    resources: Resources
    pretrain_runs: dict[str, PretrainRun] = field(default_factory=dict)  # config_hash -> run
    transfer_groups: dict[str, TransferGroup] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)  # config_hash -> MLflow run id to use
    checkpoints: dict[str, str] = field(default_factory=dict)  # pretrain hash -> checkpoint dir
    models: dict[str, str] = field(default_factory=dict)  # pretrain hash -> its logged model's id
    packs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # packed trial -> its runs' hashes
    # fit hash -> (its group, the fit) of fine-tuning fits tuned by a search (execution.search)
    searches: dict[str, tuple[TransferGroup, TransferFit]] = field(default_factory=dict)


def node_name() -> str:
    """This process's machine, as a user finds it in ``ray status``: host name and Ray node address."""
    import ray

    address = ray.util.get_node_ip_address() if ray.is_initialized() else "no Ray"
    return f"{socket.gethostname()} ({address})"


def trial_name(label: str, trial_id: str, limit: int = 100) -> str:
    """A Tune trial's name and folder: its label as users see it in MLflow (e.g. "supervised
    mnist n=300 noise=0.5"), made safe for a path (letters, digits, ``.=+-``; the rest ``_``),
    cut so the whole is at most ``limit`` characters, then the trial id, which keeps it unique."""
    safe = re.sub(r"[^A-Za-z0-9.=+-]+", "_", label.replace("->", "to")).strip("_")
    return f"{safe[: max(0, limit - len(trial_id) - 1)]}_{trial_id}".lstrip("_")


def _error_line(error_file: str | None) -> str:
    """The last line of a trial's error file: usually the exception and its message."""
    try:
        with open(error_file or "") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "FAILED"
    return f"FAILED: {redact(lines[-1])[:300]}" if lines else "FAILED"


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
        return {
            f"{p}_trials_done": self.done,
            f"{p}_trials_running": self.running,
            f"{p}_trials_failed": self.failed,
            f"{p}_trials_not_launched": self.not_launched,
            f"{p}_trials_total": self.total,
        }

    def _status(self) -> str:
        elapsed = time.monotonic() - self.t0
        ended = self.done + self.failed
        left = self.total - ended - self.not_launched
        # Each ended trial took elapsed/ended of wall time at the concurrency seen so far.
        eta = f"~{elapsed / ended * left:.0f}s left" if ended else "ETA after the first trial"
        return (
            f"done {self.done}, running {self.running}, failed {self.failed} of {self.total}; "
            f"{elapsed:.0f}s elapsed, {eta}"
        )

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
        error = (
            ""
            if ok
            else _error_line(trial.error_file) + (f" (full traceback: {trial.error_file})" if trial.error_file else "")
        )
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
        return (
            f"[{self.phase}] phase over: {self.done} done, {self.failed} failed{extra} of {self.total} trials "
            f"in {time.monotonic() - self.t0:.0f}s"
        )


def phase_stopper(deadline: float | None, fail_fast: bool, failed: Callable[[], bool]):
    """A Tune stopper that ends the whole phase (running and pending trials) once ``deadline``
    (``time.time()``) has passed, or, with ``fail_fast``, once ``failed()``. It holds no trial
    context: Tune pickles stoppers into its storage, and a context carries credentials."""
    from ray import tune

    class _Stop(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return (deadline is not None and time.time() > deadline) or (fail_fast and failed())

    return _Stop()


def run_phase(
    phase: str,
    trainable,
    key: str,
    items: dict[str, str],
    ctx: TrialContext,
    resources: float | dict,
    concurrency: int,
    summarize,
    describe_report=None,
    on_counts=None,
) -> Progress:
    """One Tune grid over ``items``, each trial holding ``resources`` (a CPU count, or a Ray
    resource dict such as ``{"CPU": 1, "GPU": 0.25}``), at most ``concurrency`` at once."""
    from ray import tune

    progress = Progress(phase, len(items), items, summarize, describe_report, on_counts)
    # Tune's own SIGINT handler ends only the current phase and returns normally, so Ctrl-C would
    # start the next phase and exit 0. Without it, Ctrl-C stops the study (exit 130, resumable).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

    # Tune's progress, experiment state and trial folders name a trial as its MLflow run is named.
    def name(t) -> str:
        return trial_name(items.get(t.config.get(key), phase), t.trial_id)

    tuner = tune.Tuner(
        named_trainable(
            tune.with_resources(
                tune.with_parameters(trainable, ctx=ctx),
                resources if isinstance(resources, dict) else {"CPU": resources},
            ),
            key,
            items,
            phase,
        ),
        param_space={key: tune.grid_search(list(items))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=name,
            trial_dirname_creator=name,
            # A trial process serves the phase's next trial: torch, MLflow and pyarrow are imported
            # and the store opened once per process, not once per trial (2.2 -> 0.2 s/trial).
            reuse_actors=reuse_trial_processes(),
        ),
        run_config=tune.RunConfig(
            name=f"{ctx.study}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=ctx.storage_path,
            callbacks=[progress.callback],
            stop=phase_stopper(None, True, lambda: progress.failed > 0) if ctx.fail_fast else None,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        tuner.fit()
    except Exception:
        # On a full storage disk Tune cannot write a failed trial's error file and then fails
        # reading it back (EOFError): say what is wrong instead of Tune's traceback.
        if (full := storage_full(ctx.storage_path)) is not None:
            raise full from None
        raise
    print(progress.summary(), flush=True)
    return progress


def named_trainable(trainable, key: str, items: dict[str, str], phase: str):
    """Function ``trainable`` as a Tune trainable class (``PHASE_trial``, e.g. ``pretrain_trial``)
    whose actors Ray names after their trial's label (``items[config[key]]``: the run name users
    see in MLflow) instead of the function: Ray takes an actor's ``repr`` as its name in the
    dashboard's actor list (``ray.util.state.list_actors()``' ``repr_name``) and in the prefix of
    its log lines. Ray reads it once, when the actor starts: a trial process reused for the
    phase's next trial (:func:`reuse_trial_processes`) keeps the name of its first."""
    from ray.tune.trainable import wrap_function

    class RunTrial(wrap_function(trainable)):
        def __repr__(self):
            config = getattr(self, "config", None) or {}
            return items.get(config.get(key), phase)

    RunTrial.__name__ = RunTrial.__qualname__ = f"{phase.replace('-', '_')}_trial"
    return RunTrial


def storage_full(storage: str) -> OSError | None:
    """An ``OSError`` naming ``storage`` if it cannot take a write now (full, read-only), else None."""
    from orchestrator.execution.preflight import check_storage

    try:
        check_storage(storage)
    except ValueError as e:
        return OSError(errno.ENOSPC if "No space" in str(e) else errno.EIO, str(e), redact(storage))
    return None


def reuse_trial_processes() -> bool:
    """Whether a phase's trials run in reused processes (``TRANSFERLAB_REUSE_TRIAL_PROCESSES``,
    default 1; 0 gives every trial a fresh process, e.g. to rule out state left by a trial)."""
    return os.environ.get("TRANSFERLAB_REUSE_TRIAL_PROCESSES", "1") != "0"


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (what light trials are packed onto)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
