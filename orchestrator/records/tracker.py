"""Writing and reading transferlab's MLflow records (the schema is :mod:`orchestrator.records.schema`).

:class:`Tracker` speaks the schema over an :class:`MlflowClient` whose every call rides out a
tracking-server outage (:mod:`orchestrator.records.retry`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.records import retry
from orchestrator.records.schema import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NOTE_TAG,
    FINISHED,
    RUNNING,
    TAG_CONFIG_HASH,
    TAG_KIND,
    TAG_PARENT,
    TAG_STUDY,
    TAG_SUPERSEDED_BY,
)
from trainers.protocols import FULL

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute tracking URI: Ray workers run in other directories than the driver.

    ``None`` means MLflow's own default (``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in
    the working directory), i.e. the store a bare ``mlflow ui`` started here shows.
    """
    if uri is None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
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
            out[key] = FULL if v is None else str(v)
    return out


class Tracker:
    """Thin layer over :class:`MlflowClient` that speaks the schema above. Every call is retried
    through a tracking-server outage up to a deadline (:mod:`orchestrator.records.retry`).
    ``tags`` go on every run it creates (provenance: :mod:`orchestrator.records.provenance`)."""

    def __init__(self, tracking_uri: str, tags: dict[str, str] | None = None):
        self.uri = tracking_uri
        self.tags = dict(tags or {})
        # MLflow is imported by the first Tracker, not with this module: `validate` and `plan`
        # of a study that names no tracking server never touch MLflow, and start faster.
        from mlflow.tracking import MlflowClient

        self.client = retry.RetryingClient(MlflowClient(tracking_uri), tracking_uri)

    def experiment_id(self, study: str, create: bool = True) -> str | None:
        exp = self.client.get_experiment_by_name(study)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment '{study}' is deleted; restore it or rename the study")
            return exp.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(study)
        except Exception as e:  # another driver created it a moment ago
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(study).experiment_id

    def describe_experiment(self, experiment_id: str, note: str) -> None:
        """Mark the experiment as model training (MLflow then opens it on its runs table, not on
        the GenAI overview) and set its description, shown above the runs."""
        self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.client.set_experiment_tag(experiment_id, EXPERIMENT_NOTE_TAG, note)

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
        """config_hash -> run: :func:`run_per_config` of the experiment's runs of ``kind``."""
        return run_per_config(self.runs(experiment_id, kind))

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
        all_tags = {**self.tags, TAG_KIND: kind, TAG_STUDY: study, TAG_CONFIG_HASH: config_hash, **(tags or {})}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=name, tags=all_tags)
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        params: dict | None = None,
        metrics: dict | None = None,
        tags: dict | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        existing = self.client.get_run(run_id).data.params if params else {}
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            # Params are immutable in MLflow: a resumed run re-logs only what it lacks.
            params=[Param(k, v) for k, v in flatten(params or {}).items() if k not in existing],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_inputs(self, run_id: str, inputs: Iterable[tuple[str, str, str, str]], models: Iterable[str] = ()) -> None:
        """Dataset inputs of a run, shown in the MLflow UI's Dataset column: (name, fingerprint,
        URI, context) each — ``training`` for a pretraining source, ``transfer`` for a task; and
        the ids of the logged models it used (a transfer run: its pretraining run's model).
        Logging the same input again adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from orchestrator.records.models import model_inputs

        datasets = [
            DatasetInput(
                Dataset(name, digest, "s3" if uri.startswith("s3://") else "local", uri),
                tags=[InputTag("mlflow.data.context", context)],
            )
            for name, digest, uri, context in inputs
        ]
        self.client.log_inputs(run_id, datasets=datasets, models=model_inputs(models) or None)

    def finish(self, run_id: str, status: str = FINISHED) -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RUNNING)


def run_per_config(runs: Iterable) -> dict[str, object]:
    """config_hash -> the one run that stands for that job: the newest FINISHED run (latest end
    time) if there is one, else the most recently started. Runs without a config hash are left out.

    Two drivers on one study (before the study lease) could leave two FINISHED runs of one
    job; everything that reads results counts the job once, through this choice."""

    def rank(r) -> tuple:
        done = r.info.status == FINISHED
        return (done, (r.info.end_time or 0) if done else 0, r.info.start_time or 0, r.info.run_id)

    best: dict[str, object] = {}
    for r in runs:
        h = r.data.tags.get(TAG_CONFIG_HASH)
        if h is not None and (h not in best or rank(r) > rank(best[h])):
            best[h] = r
    return best


def unfinished_reruns(runs: Iterable) -> dict[str, object]:
    """config_hash -> the newest run that is not FINISHED and started after the run that stands
    for its job (:func:`run_per_config`) when that one is FINISHED: a recomputation
    (``run --rerun-changed``) an earlier driver left unfinished, to resume rather than start
    another."""
    runs = list(runs)
    best = run_per_config(runs)
    out: dict[str, object] = {}
    for r in runs:
        h = r.data.tags.get(TAG_CONFIG_HASH)
        standing = best.get(h)
        if standing is None or standing.info.status != FINISHED or r.info.status == FINISHED:
            continue
        if (r.info.start_time or 0) >= (standing.info.start_time or 0) and (
            h not in out or (r.info.start_time or 0) > (out[h].info.start_time or 0)
        ):
            out[h] = r
    return out


def superseded(runs: Iterable) -> dict[str, str]:
    """run id -> the run that stands for its job, for every FINISHED run that no longer does
    (a newer FINISHED run of its config hash exists) and is not tagged so yet
    (:data:`~orchestrator.records.schema.TAG_SUPERSEDED_BY`)."""
    runs = list(runs)
    best = run_per_config(runs)
    return {
        r.info.run_id: standing.info.run_id
        for r in runs
        if r.info.status == FINISHED
        and (standing := best.get(r.data.tags.get(TAG_CONFIG_HASH))) is not None
        and standing.info.run_id != r.info.run_id
        and r.data.tags.get(TAG_SUPERSEDED_BY) != standing.info.run_id
    }


def logged_steps(client: MlflowClient, run_id: str, keys: Iterable[str]) -> set[tuple[str, int]]:
    return {(k, m.step) for k in keys for m in client.get_metric_history(run_id, k)}
