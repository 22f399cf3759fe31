"""A study's MLflow runs as DataFrames: the one place the analysis reads the tracking store.

Runs are read with the search API (``MlflowClient.search_runs``, paged) and transfer runs are
joined to their pretraining run through the ``mlflow.parentRunId`` tag. Only FINISHED runs enter
the frames; every job is counted by kind and status so a report can say it is partial. A job
is counted once however many runs it has (:func:`one_run_per_config`).
Column names are the MLflow param and metric names of :mod:`orchestrator.records.schema`, except the
pretraining run's ``seed``, which becomes ``pretrain_seed`` beside the transfer run's ``seed``.
With ``cached=True`` runs and artifacts come through :class:`~orchestrator.analysis.run_cache.RunCache`,
which asks MLflow only for what changed since the last read.
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pandas as pd

from orchestrator.analysis import AnalysisError
from orchestrator.analysis.run_cache import RunCache
from orchestrator.records.retry import redact
from orchestrator.records.schema import (
    FINISHED,
    KIND_DATAMODELS,
    KIND_PRETRAIN,
    KIND_STUDY,
    KIND_TRANSFER,
    METRIC_ACCURACY,
    METRIC_MEAN_PER_CLASS_ACCURACY,
    METRIC_NUM_TRAIN_SAMPLES,
    METRIC_UPSTREAM_ACCURACY,
    OUTPUTS_TEST,
    PARAM_CLASS_FRACTION,
    PER_EXAMPLE_ARTIFACT,
    PRETRAIN_PARAMS,
    PRETRAIN_SETTING_PARAMS,
    TAG_CONFIG_HASH,
    TAG_KIND,
    TAG_PARENT,
    TRANSFER_PARAMS,
    VIEW_MASK_ARTIFACT,
)
from orchestrator.records.tracker import Tracker, run_per_config
from trainers.protocols import FULL

_COUNTED = (KIND_PRETRAIN, KIND_TRANSFER, KIND_DATAMODELS)  # run kinds whose status the report shows
PRETRAIN_SEED = "pretrain_seed"
PRETRAIN_RUN_ID, RUN_ID, ARTIFACT_URI = "pretrain_run_id", "run_id", "artifact_uri"


@dataclass
class StudyRuns:
    """The finished runs of one study, and how many runs of each kind are in which state."""

    study: str
    experiment_id: str
    study_run_id: str | None
    pretrain: pd.DataFrame  # one row per FINISHED pretraining run
    transfer: pd.DataFrame  # one row per FINISHED transfer run whose parent is a finished pretraining run
    status: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> count
    tracking_uri: str | None = None  # the store they were read from (mlflow-artifacts: URIs resolve against it)
    end_times: dict[str, int | None] = field(default_factory=dict)  # run id -> end time (ms): its version
    cache: RunCache | None = None  # where artifacts read for these runs are kept, if anywhere

    @property
    def partial(self) -> bool:
        """True while any pretraining or transfer run is not FINISHED (running, failed, killed)."""
        return any(s != FINISHED and n for kind in _COUNTED for s, n in self.status.get(kind, {}).items())

    def status_line(self) -> str:
        parts = []
        for kind in _COUNTED:
            counts = self.status.get(kind, {})
            if not counts and (kind == KIND_DATAMODELS or self.status.get(KIND_DATAMODELS)):
                continue  # a datamodels study has no pretrain/transfer runs, other studies no datamodels runs
            total = sum(counts.values())
            others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s != FINISHED and n)
            parts.append(f"{counts.get(FINISHED, 0)}/{total} {kind} runs finished" + (f" ({others})" if others else ""))
        return "; ".join(parts)


def numeric_size(pretrain_size: str, num_train_samples: float | None) -> float:
    """Pretraining set size as a number: the logged sample count, else the ``pretrain_size`` param."""
    if num_train_samples is not None and np.isfinite(num_train_samples):
        return float(num_train_samples)
    return float("nan") if pretrain_size in (None, FULL) else float(pretrain_size)


def shots_value(shots: str) -> float:
    """Shots per class as a number; ``full`` is +inf so it sorts last and stays off log axes."""
    return float("inf") if shots == FULL else float(shots)


def _float(value, default=float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _pretrain_row(run) -> dict:
    p, m = run.data.params, run.data.metrics
    row = {RUN_ID: run.info.run_id, "run_name": run.info.run_name, ARTIFACT_URI: run.info.artifact_uri}
    row.update({k: p.get(k) for k in PRETRAIN_PARAMS})
    row.update({k: p.get(k) for k in PRETRAIN_SETTING_PARAMS})  # strings as logged; None when absent
    row[PRETRAIN_SEED] = row.pop("seed")
    row["label_noise"] = _float(row["label_noise"], 0.0)
    row[PARAM_CLASS_FRACTION] = _float(p.get(PARAM_CLASS_FRACTION), 1.0)
    row[METRIC_UPSTREAM_ACCURACY] = m.get(METRIC_UPSTREAM_ACCURACY, float("nan"))
    row[METRIC_NUM_TRAIN_SAMPLES] = numeric_size(row["pretrain_size"], m.get(METRIC_NUM_TRAIN_SAMPLES))
    return row


def _transfer_row(run) -> dict:
    p, m = run.data.params, run.data.metrics
    row = {RUN_ID: run.info.run_id, PRETRAIN_RUN_ID: run.data.tags.get(TAG_PARENT), ARTIFACT_URI: run.info.artifact_uri}
    row.update({k: p.get(k) for k in TRANSFER_PARAMS})
    row["layer"] = row["layer"] if row["layer"] is not None else ""
    row["shots_n"] = shots_value(row["shots"]) if row["shots"] is not None else float("nan")
    for k in (METRIC_ACCURACY, METRIC_MEAN_PER_CLASS_ACCURACY):
        row[k] = m.get(k, float("nan"))
    return row


def one_run_per_config(runs: list) -> tuple[list, dict[str, str]]:
    """``runs`` with one run per kind and config hash (:func:`run_per_config`: the newest
    FINISHED one), runs without a hash all kept; and the pretraining run id each dropped
    duplicate maps to (the kept run of its job), so that the transfer runs under a dropped
    duplicate are read under the kept one instead of being lost."""
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get(TAG_KIND), []).append(r)
    out = list(by_kind.pop(KIND_STUDY, []))  # the study's runs are not jobs: the first one is the study run
    for group in by_kind.values():
        kept = {r.info.run_id for r in run_per_config(group).values()}
        out += [r for r in group if r.info.run_id in kept or r.data.tags.get(TAG_CONFIG_HASH) is None]
    pretrain = by_kind.get(KIND_PRETRAIN, [])
    winners = run_per_config(pretrain)
    same_job = {
        r.info.run_id: winners[h].info.run_id for r in pretrain if (h := r.data.tags.get(TAG_CONFIG_HASH)) is not None
    }
    return out, same_job


def frames_from_runs(study: str, experiment_id: str, runs: list) -> StudyRuns:
    """Build the frames from a list of MLflow ``Run`` objects (pure: no store access).

    A job with several runs (same config hash) counts once: :func:`one_run_per_config`."""
    status: dict[str, dict[str, int]] = {}
    pre_rows, tr_rows, study_runs = [], [], []
    runs, same_job = one_run_per_config(runs)
    for r in runs:
        kind = r.data.tags.get(TAG_KIND)
        counts = status.setdefault(kind, {})
        counts[r.info.status] = counts.get(r.info.status, 0) + 1
        if kind == KIND_STUDY:
            study_runs.append(r)
        elif r.info.status != FINISHED:
            continue
        elif kind == KIND_PRETRAIN:
            pre_rows.append(_pretrain_row(r))
        elif kind == KIND_TRANSFER:
            row = _transfer_row(r)
            row[PRETRAIN_RUN_ID] = same_job.get(row[PRETRAIN_RUN_ID], row[PRETRAIN_RUN_ID])
            tr_rows.append(row)
    pretrain = pd.DataFrame(
        pre_rows,
        columns=[
            RUN_ID,
            "run_name",
            ARTIFACT_URI,
            *[k for k in PRETRAIN_PARAMS if k != "seed"],
            *PRETRAIN_SETTING_PARAMS,
            PRETRAIN_SEED,
            PARAM_CLASS_FRACTION,
            METRIC_UPSTREAM_ACCURACY,
            METRIC_NUM_TRAIN_SAMPLES,
        ],
    )
    transfer = pd.DataFrame(
        tr_rows,
        columns=[
            RUN_ID,
            PRETRAIN_RUN_ID,
            ARTIFACT_URI,
            *TRANSFER_PARAMS,
            "shots_n",
            METRIC_ACCURACY,
            METRIC_MEAN_PER_CLASS_ACCURACY,
        ],
    )
    joined = transfer.merge(
        pretrain.drop(columns=["run_name", ARTIFACT_URI]).rename(columns={RUN_ID: PRETRAIN_RUN_ID}),
        on=PRETRAIN_RUN_ID,
        how="inner",
    )
    study_runs.sort(key=lambda r: r.info.start_time or 0)
    sr = StudyRuns(study, experiment_id, study_runs[0].info.run_id if study_runs else None, pretrain, joined, status)
    sr.end_times = {r.info.run_id: r.info.end_time for r in runs}
    return sr


def load_study(tracker: Tracker, study: str, cached: bool = False, refresh: bool = False) -> StudyRuns:
    """Every run of the study's experiment, as frames; AnalysisError for an unknown or empty study.

    ``cached``: read through the local run cache (:mod:`orchestrator.analysis.run_cache`), which
    asks MLflow only for runs that changed; ``refresh`` rebuilds that cache from every run."""
    exp = tracker.client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise AnalysisError("study", f"no study named '{study}' in {tracker.uri}")
    cache = RunCache(tracker.uri, exp.experiment_id, exp.creation_time, refresh=refresh) if cached else None
    runs = cache.runs(tracker.client) if cache else tracker.runs(exp.experiment_id)
    sr = frames_from_runs(study, exp.experiment_id, runs)
    sr.tracking_uri, sr.cache = tracker.uri, cache
    if sr.pretrain.empty and not any(sr.status.get(k) for k in _COUNTED):
        raise AnalysisError("study", f"study '{study}' has no pretraining or transfer runs yet")
    return sr


# ---------------------------------------------------------------------------------------------
# Artifacts: class masks (Jain et al.'s datamodel inputs) and per-example outputs.


def _download(artifact_uri: str, path: str, dst: str, tracking_uri: str | None) -> Path | None:
    """Artifact ``path`` of the run at ``artifact_uri``, downloaded under ``dst``; None only when
    the run has no such artifact. Any other failure (store unreachable, no permission) raises
    :class:`AnalysisError`: read as "absent", a class mask would silently become all classes."""
    base = artifact_uri.rstrip("/")
    folder, _, name = path.rpartition("/")
    try:
        listed = mlflow.artifacts.list_artifacts(
            artifact_uri=f"{base}/{folder}" if folder else base, tracking_uri=tracking_uri
        )
        if not any(f.path.rsplit("/", 1)[-1] == name and not f.is_dir for f in listed or []):
            return None
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}", dst_path=dst, tracking_uri=tracking_uri)
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AnalysisError(
            "artifacts", f"cannot read {path} of the run at {redact(base)}: {type(e).__name__}: {redact(first)[:200]}"
        ) from None


def _fetch_all(artifact_uris: list[str], path: str, read, tracking_uri: str | None, threads: int = 8) -> list:
    """``read(local_file)`` of ``path`` under each run's artifact URI (None where absent), in order.

    Artifact URIs come from the runs already searched, so no store lookup is made per run.
    """
    with tempfile.TemporaryDirectory(prefix="transferlab-artifacts-") as tmp:

        def one(i_uri):
            i, uri = i_uri
            local = _download(uri, path, str(Path(tmp) / str(i)), tracking_uri)
            return None if local is None else read(local)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(one, enumerate(artifact_uris)))


def _fetch(artifact_uris: list[str], path: str, read, tracking_uri, cache, keys, name: str) -> pd.DataFrame:
    """The rows ``read(local_file)`` gives for ``path`` of each run, as one table whose column
    ``_i`` is the run's position in ``artifact_uris`` (runs without the artifact have no rows);
    through ``cache`` (a :class:`RunCache`) when given, keyed by ``keys`` (run id, end time per
    URI). ``name`` says what ``read`` takes from the file."""
    if cache is not None:
        return cache.artifacts(
            f"{path}:{name}", keys, lambda idx: _fetch_all([artifact_uris[i] for i in idx], path, read, tracking_uri)
        )
    tables = _fetch_all(artifact_uris, path, read, tracking_uri)
    present = [t.assign(_i=i) for i, t in enumerate(tables) if t is not None]
    return pd.concat(present, ignore_index=True) if present else pd.DataFrame(columns=["_i"])


def _read_mask(p: Path) -> pd.DataFrame:
    d = json.loads(p.read_text())
    return pd.DataFrame({"class": [str(c) for c in d["classes"]], "included": np.asarray(d["included"], dtype=bool)})


def class_masks(
    artifact_uris: list[str], tracking_uri: str | None = None, cache: RunCache | None = None, keys: list | None = None
) -> tuple[list[str], np.ndarray]:
    """Class names and a bool mask [runs × classes] from each run's ``view/class_mask.json``.

    A run without the artifact trained on every class (its row is all True). Returns ``([], empty)``
    when no run has a mask. ``cache`` and ``keys`` (run id, end time per URI): read through a
    :class:`RunCache`.
    """
    rows = _fetch(artifact_uris, VIEW_MASK_ARTIFACT, _read_mask, tracking_uri, cache, keys, "class,included")
    if rows.empty:
        return [], np.zeros((len(artifact_uris), 0), dtype=bool)
    i = rows["_i"].to_numpy(int)
    names = rows.loc[i == i.min(), "class"].tolist()  # the first run's class order
    col = pd.Index(names).get_indexer(rows["class"])
    mask = np.ones((len(artifact_uris), len(names)), dtype=bool)
    ok = col >= 0
    mask[i[ok], col[ok]] = rows["included"].to_numpy(bool)[ok]
    return names, mask


def per_example_outputs(
    artifact_uris: list[str],
    column: str = "correct_prob",
    tracking_uri: str | None = None,
    cache: RunCache | None = None,
    keys: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Examples (ids) and a matrix [runs × examples] of ``column`` from ``outputs/per_example.parquet``.

    Runs without the artifact, and examples a run lacks, are NaN. ``cache`` and ``keys``: as
    :func:`class_masks`.
    """
    rows = _fetch(
        artifact_uris,
        PER_EXAMPLE_ARTIFACT,
        lambda p: pd.read_parquet(p, columns=["example", column]),
        tracking_uri,
        cache,
        keys,
        f"example,{column}",
    )
    if rows.empty:
        return np.zeros(0, dtype=int), np.full((len(artifact_uris), 0), np.nan)
    examples = np.unique(rows["example"].to_numpy())
    out = np.full((len(artifact_uris), len(examples)), np.nan)
    out[rows["_i"].to_numpy(int), np.searchsorted(examples, rows["example"].to_numpy())] = rows[column].to_numpy(
        dtype=float
    )
    return examples, out


@dataclass(frozen=True)
class InfluenceInputs:
    """What influence estimation needs for one (task, protocol): one row per pretraining run."""

    task: str
    protocol: str
    source: str | None
    shots: str  # the transfer setting used: 'full' when present, else the most shots
    classes: list[str]
    masks: np.ndarray  # bool [models × classes]
    outputs: np.ndarray  # float [models × examples], mean over transfer seeds
    examples: np.ndarray  # example ids (columns of outputs), positions in ``split``
    # Which examples the outputs are on (schema OUTPUTS_*): a datamodel table's influence holdout, or
    # the task's test split (transfer runs' per-example outputs; tables written before the holdout),
    # which also scores the counterfactual follow-up.
    split: str = OUTPUTS_TEST
    output: str = "correct_prob"  # which per-example output ``outputs`` holds: correct_prob | margin

    @property
    def output_words(self) -> str:
        return OUTPUT_WORDS.get(self.output, self.output)


OUTPUT_WORDS = {"correct_prob": "correct-class probability", "margin": "margin (true-class logit − largest other)"}


def at_largest_shots(t: pd.DataFrame) -> pd.DataFrame:
    """The rows of the largest shots setting of ``t`` ('full' if present): what counterfactual
    and influence comparisons compare, like with like."""
    shots = FULL if (t["shots"] == FULL).any() else t.loc[t["shots_n"].idxmax(), "shots"]
    return t[t["shots"] == shots]


def influence_inputs(
    sr: StudyRuns, task: str, protocol: str, source: str | None = None, column: str = "correct_prob"
) -> InfluenceInputs | None:
    """Class masks of the pretraining runs (of ``source``, if given) and their per-example outputs on ``task``.

    None when no pretraining run has a class mask (the study did not subset classes) or no
    transfer run of this task stored per-example outputs.
    """
    t = sr.transfer[(sr.transfer["task"] == task) & (sr.transfer["protocol"] == protocol)]
    if source is not None:
        t = t[t["source"] == source]
    if t.empty:
        return None
    t = at_largest_shots(t)
    pre_ids = sorted(t[PRETRAIN_RUN_ID].unique())
    pre_uris = sr.pretrain.set_index(RUN_ID).loc[pre_ids, ARTIFACT_URI].tolist()
    pre_keys = [(rid, sr.end_times.get(rid)) for rid in pre_ids]
    classes, masks = class_masks(pre_uris, sr.tracking_uri, sr.cache, pre_keys)
    if not classes or masks.all():
        return None
    keys = [(rid, sr.end_times.get(rid)) for rid in t[RUN_ID]]
    examples, out = per_example_outputs(t[ARTIFACT_URI].tolist(), column, sr.tracking_uri, sr.cache, keys)
    if out.shape[1] == 0:
        return None
    row = {rid: i for i, rid in enumerate(pre_ids)}
    sums, counts = np.zeros((len(pre_ids), out.shape[1])), np.zeros((len(pre_ids), out.shape[1]))
    for i, pid in enumerate(t[PRETRAIN_RUN_ID]):
        ok = np.isfinite(out[i])
        sums[row[pid], ok] += out[i, ok]
        counts[row[pid], ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)
    return InfluenceInputs(task, protocol, source, str(t["shots"].iloc[0]), classes, masks, mean, examples)
