"""The MLflow schema of transferlab, in one place, and the helpers that write and read it.

Schema
======
Experiment: the study name. Runs form a three-level tree (``mlflow.parentRunId``):

=========  =====================================  ==================================================
kind       params                                 metrics
=========  =====================================  ==================================================
study      ``study``, ``spec_hash``               ``pretrain_runs``, ``transfer_runs``,
                                                  ``failed_runs`` (counts after each ``run``);
                                                  this ``run``'s transfer work:
                                                  ``transfer_fits_run``, ``feature_extractions``
                                                  (layer feature sets computed from images) and
                                                  ``feature_cache_hits`` (read from the cache);
                                                  live, per phase (``pretrain``/``transfer``/
                                                  ``finetune_search``):
                                                  ``PHASE_trials_done|running|failed|
                                                  not_launched|total``, updated at each
                                                  trial start and end (step = the ``run``)
pretrain   ``method, source, pretrain_size,       ``train_loss`` and ``images_per_second`` per
           label_noise, model, seed`` + the       epoch (step = epoch), ``upstream_accuracy``
           other settings (``image_size,          on the source's held-out (test) split, restricted
           epochs, batch_size, lr, ...``),        to the classes the run trained on (supervised:
           ``class_fraction`` when swept,         top-1 of its head; clip: zero-shot top-1 with
           ``caption_noise`` (clip runs) and      "a photo of a {class}." prompts of every source
           ``view_fingerprint``                   class; simclr: k-NN top-1 against its training
                                                  features), ``realized_label_noise`` (fraction
                                                  of labels actually flipped),
                                                  ``num_train_samples``; clip runs with caption
                                                  noise: ``realized_caption_noise`` per epoch
                                                  (share of captions swapped), ``trial_seconds``
                                                  (wall time of the trial that finished it)
transfer   ``task, protocol, shots, seed,         ``accuracy`` (task test split),
           layer`` + ``val_fraction``;            ``mean_per_class_accuracy``,
           protocol is one of linear_probe,       ``num_train_examples``; probes and fine-tuning:
           logistic, finetune, lp_ft, zero_shot   ``validation_accuracy``; linear_probe and
           (``shots`` 0, ``seed`` 0); finetune    logistic: ``l2_reg``; finetune and lp_ft:
           and lp_ft add ``finetune_lr,           ``learning_rate`` (the one chosen on
           finetune_steps, finetune_batch_size,   validation); searched fits also
           finetune_weight_decay`` (searched      ``weight_decay`` (chosen),
           fits: ``finetune_steps,                ``search_trials``,
           finetune_batch_size`` + ``search_*``)  ``search_trials_stopped_early``,
                                                  ``search_seconds``
=========  =====================================  ==================================================

Searched fits (``transfer.finetune.search``, orchestrator.search) carry the search's settings as
params ``search_algorithm, search_num_samples, search_lr`` (``lo,hi``), ``search_weight_decay``,
``search_eval_every, search_seed, search_max_concurrent_trials`` and, for asha,
``search_grace_steps, search_reduction_factor``; and the artifact ``search/trials.json``:
``{"algorithm", "max_steps", "chosen": index, "trials": [{"trial", "lr", "weight_decay", "steps"
(reached), "val_accuracy" (at the last report), "stopped_early", "history": [{"step",
"val_accuracy"}, ...]}, ...]}`` in sampling order. The study run's live counts of that phase are
``finetune_search_trials_*``, counting searched fits.

Artifacts: a pretrain run whose view drops classes stores ``view/class_mask.json``
(``{"classes": [...names], "included": [...bools]}``): the datamodel mask of Jain et al.
Every transfer run stores ``outputs/per_example.parquet``: one row per test example of the task
with columns ``example`` (int, position in the task's test split, stable across runs), ``key``
(sample key), ``label``, ``prediction``, ``correct_prob`` (softmax probability of the true
class) and ``margin`` (true-class logit minus the largest other logit) — the raw material of
influence estimation.
Analysis outputs (``orchestrator.analysis``): ``transferlab report`` logs its HTML, CSV tables,
PNG figures and fitted numbers under ``report/`` on the study run; ``transferlab counterfactual``
logs the follow-up plan (``counterfactual/plan.json``: follow-up study name, and per source
added: arm ``harmful|helpful|random|baseline``, K and the removed classes) on the study run too.

Datamodel studies (a ``datamodels:`` section) replace the pretrain/transfer levels with two:
a ``datamodels`` run under the study run (params: ``source, task, class_fraction,
seed, models_per_trial, protocol, shots, transfer_seed, val_fraction`` + the pretraining
settings; tag ``transferlab.datamodel_table``: where the table lives; metrics ``models_done``,
``models_total`` (the spec's ``num_models``: a rerun with more extends the sweep),
``failed_trials``, one step per ``run``), and one ``datamodel_batch`` run per
finished trial under it (params ``first_model, last_model, models``; metrics ``models``,
``seconds``, ``models_per_hour``, ``mean_accuracy``; the trial's table part as artifact under
``datamodels/``). Thousands of models are rows of the table, not MLflow runs. The **table** is
a Parquet dataset (``TABLE/models/``, readable as one table by ``pandas.read_parquet``), one
file per finished trial (``models-FIRST-LAST.parquet``, written atomically), one row per model: ``model`` (index), ``seed``, ``mask`` (list of bool, one per
source class), ``num_train_samples``, ``train_loss``, ``accuracy`` (task test split) and
per-target-example lists ``correct_prob``, ``margin``, ``prediction`` (position = ``example``);
beside ``models/``, ``examples.parquet`` (``example, key, label``) and ``sweep.json`` (class names,
config hash, settings).

Tags on every run: ``transferlab.kind`` (study|pretrain|transfer), ``transferlab.study``,
``transferlab.config_hash`` (hash of everything that determines the result: a finished run with
this hash means the job is done), ``mlflow.runName``. Pretrain runs also carry
``transferlab.checkpoint`` (the checkpoint directory transfer runs read). ``pretrain_size`` is
``full`` when the whole source is used; ``shots`` is ``full`` for the whole training pool.

Run status: FINISHED means done (the job is skipped next time). FAILED: the trial failed, or
the run was left RUNNING by a driver that died and no later ``run`` resumed it (superseded, or
no longer in the grid). KILLED: ``transferlab run`` stopped it on purpose (``budget.max_hours``
reached, ``--fail-fast``). FAILED and KILLED runs whose job is still in the grid are reopened,
with the same run id, by the next ``run``. One ``transferlab run`` drives a study at a time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator import retry

TAG_KIND = "transferlab.kind"
TAG_STUDY = "transferlab.study"
TAG_CONFIG_HASH = "transferlab.config_hash"
TAG_CHECKPOINT = "transferlab.checkpoint"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"

KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER = "study", "pretrain", "transfer"
KIND_DATAMODELS, KIND_DATAMODEL_BATCH = "datamodels", "datamodel_batch"
TAG_DATAMODEL_TABLE = "transferlab.datamodel_table"
DATAMODEL_PART_ARTIFACT_DIR = "datamodels"

PRETRAIN_PARAMS = ("method", "source", "pretrain_size", "label_noise", "model", "seed")
TRANSFER_PARAMS = ("task", "protocol", "shots", "seed", "layer")

METRIC_TRAIN_LOSS = "train_loss"
METRIC_UPSTREAM_ACCURACY = "upstream_accuracy"
METRIC_ACCURACY = "accuracy"
METRIC_MEAN_PER_CLASS_ACCURACY = "mean_per_class_accuracy"
METRIC_NUM_TRAIN_SAMPLES = "num_train_samples"
PARAM_CLASS_FRACTION = "class_fraction"
METRIC_TRIAL_SECONDS = "trial_seconds"

VIEW_MASK_ARTIFACT = "view/class_mask.json"
PER_EXAMPLE_ARTIFACT = "outputs/per_example.parquet"
REPORT_ARTIFACT_DIR = "report"
COUNTERFACTUAL_PLAN_ARTIFACT = "counterfactual/plan.json"

FINISHED, FAILED, RUNNING, KILLED = "FINISHED", "FAILED", "RUNNING", "KILLED"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute tracking URI: Ray workers run in other directories than the driver.

    ``None`` means MLflow's own default (``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in
    the working directory), i.e. the store a bare ``mlflow ui`` started here shows.
    """
    if uri is None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        raise ValueError(f"tracking URI {uri!r} has no scheme (use sqlite:///PATH or http://HOST:PORT)")
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts into dotted MLflow params with string values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = "full" if v is None else str(v)
    return out


class Tracker:
    """Thin layer over :class:`MlflowClient` that speaks the schema above. Every call is retried
    through a tracking-server outage up to a deadline (:mod:`orchestrator.retry`)."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = retry.RetryingClient(MlflowClient(tracking_uri), tracking_uri)

    def experiment_id(self, study: str, create: bool = True) -> str | None:
        exp = self.client.get_experiment_by_name(study)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment '{study}' is deleted; restore it or rename the study")
            return exp.experiment_id
        return self.client.create_experiment(study) if create else None

    def runs(self, experiment_id: str, kind: str | None = None) -> list:
        """All runs of the experiment (optionally of one kind), paging through the search API."""
        flt = f"tags.`{TAG_KIND}` = '{kind}'" if kind else ""
        out, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def runs_by_hash(self, experiment_id: str, kind: str) -> dict[str, object]:
        """config_hash -> run, preferring a FINISHED run, else the most recent one."""
        best: dict[str, object] = {}
        for r in self.runs(experiment_id, kind):
            h = r.data.tags.get(TAG_CONFIG_HASH)
            if h is None:
                continue
            cur = best.get(h)
            rank = (r.info.status == FINISHED, r.info.start_time or 0)
            if cur is None or rank > (cur.info.status == FINISHED, cur.info.start_time or 0):
                best[h] = r
        return best

    def create_run(
        self,
        experiment_id: str,
        kind: str,
        study: str,
        name: str,
        config_hash: str,
        params: dict,
        parent_run_id: str | None = None,
        tags: dict | None = None,
    ) -> str:
        all_tags = {TAG_KIND: kind, TAG_STUDY: study, TAG_CONFIG_HASH: config_hash, **(tags or {})}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=name, tags=all_tags)
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None, step: int = 0) -> None:
        now = int(time.time() * 1000)
        existing = self.client.get_run(run_id).data.params if params else {}
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            # Params are immutable in MLflow: a resumed run re-logs only what it lacks.
            params=[Param(k, v) for k, v in flatten(params or {}).items() if k not in existing],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def finish(self, run_id: str, status: str = FINISHED) -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RUNNING)


def logged_steps(client: MlflowClient, run_id: str, keys: Iterable[str]) -> set[tuple[str, int]]:
    return {(k, m.step) for k in keys for m in client.get_metric_history(run_id, k)}


try:
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - ray is a hard dependency; keeps this module importable
    UserCallback = object


class MLflowReportCallback(UserCallback):
    """Turns every ``ray.train.report`` of rank 0 into MLflow metrics of a driver-created run.

    Runs on the Ray Train controller, so training loops stay MLflow-agnostic. Metrics are logged
    with ``step = metrics["epoch"]``; steps already present (a resumed run) are not logged again.
    ``mlflow_env`` carries the driver's MLflow credentials (``orchestrator.cluster.MLFLOW_CLIENT_ENV``)
    into the controller's process.

    While the tracking server is down, reports go to a durable spool in the study's storage
    (:mod:`orchestrator.spool`) and training goes on; the next report that reaches the server, the
    trial before it finishes the run, or the next ``transferlab run`` sends them, once each.
    """

    def __init__(self, tracking_uri: str, run_id: str, mlflow_env: dict[str, str] | None = None, spool_storage: str | None = None):
        self.tracking_uri, self.run_id, self.spool_storage = tracking_uri, run_id, spool_storage
        self._mlflow_env = dict(mlflow_env or {})
        self._client = None
        self._seen: set[tuple[str, int]] = set()
        self._known: set[str] = set()  # metric keys whose history in MLflow has been read
        self._pending: list[Metric] = []
        self._spooled = False

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        report = dict(metrics[0])
        step = int(report.pop("epoch", 0))
        numeric = {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # The timestamp is fixed now, so a resent batch is the same batch.
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, v, now, step) for k, v in numeric.items())
        try:
            self._flush()
        except Exception as e:
            if not retry.is_transient(e) or self.spool_storage is None:
                raise
            from orchestrator import spool

            spool.write(self.spool_storage, self.run_id, self._pending)
            self._spooled = True
            print(f"warning: tracking server {retry.redact(self.tracking_uri)} unreachable; {len(self._pending)} "
                  f"metric value(s) of step {step} kept in the storage spool until it is back", flush=True)
            self._pending = []

    def _flush(self) -> None:
        if self._client is None:
            from orchestrator.cluster import apply_mlflow_client_env

            apply_mlflow_client_env(self._mlflow_env)
            self._client = MlflowClient(self.tracking_uri)
        unknown = {m.key for m in self._pending} - self._known
        if unknown:
            self._seen |= logged_steps(self._client, self.run_id, unknown)
            self._known |= unknown
        new = [m for m in self._pending if (m.key, m.step) not in self._seen]
        if new:
            self._client.log_batch(self.run_id, metrics=new)
            self._seen.update((m.key, m.step) for m in new)
        self._pending.clear()
        if self._spooled:  # the server is back: send what earlier reports left in the spool
            from orchestrator import spool

            spool.flush(self.spool_storage, self._client, self.run_id)
            self._spooled = False
