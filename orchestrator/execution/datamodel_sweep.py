"""Datamodel sweeps (Jain et al. 2022): many small models on random class subsets of a source.

A study with a ``datamodels:`` section trains ``num_models`` supervised models, model i on the
classes :func:`orchestrator.plan._kept_classes` picks for seed ``seed * MAX_DATAMODELS + i``
(the same pure, seeded class-subset view a ``class_fraction`` sweep uses), and probes each one's
frozen features on the task. Models run ``models_per_trial`` at a time in plain Ray Tune
function trials, stacked with ``torch.func`` (:mod:`trainers.datamodels`): no TorchTrainer per
model, whose ~12 s start-up would dominate a model that trains in a second.

Results go to one columnar table (the layout is documented in :mod:`orchestrator.tracking`):
each finished trial writes one Parquet part atomically, so a rerun skips every model index a
part holds and a killed trial leaves nothing half-written. MLflow gets one ``datamodels`` run for
the sweep and one ``datamodel_batch`` run per finished trial, not one run per model.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import retry
from orchestrator.cluster import apply_mlflow_client_env
from orchestrator.spec import FULL, MAX_DATAMODELS, PretrainSettings, SpecError, StudySpec
from orchestrator.tracking import (
    DATAMODEL_PART_ARTIFACT_DIR,
    FAILED,
    FINISHED,
    KILLED,
    KIND_DATAMODEL_BATCH,
    KIND_DATAMODELS,
    TAG_DATAMODEL_TABLE,
    Tracker,
)

SWEEP_FILE, EXAMPLES_FILE = "sweep.json", "examples.parquet"
MODELS_DIR, PART_PREFIX = "models", "models-"  # MODELS_DIR holds only parts: a plain Parquet dataset


@dataclass(frozen=True)
class DatamodelPlan:
    """Everything a datamodel sweep needs: the models' class masks and seeds, and where data lives."""

    config_hash: str  # of everything but num_models and models_per_trial: a larger sweep extends this one
    source: str
    source_root: str
    task: str
    task_root: str
    classes: tuple[str, ...]  # the source's classes (mask columns)
    settings: dict  # PretrainSettings as a dict
    model_config: dict
    masks: np.ndarray  # bool [num_models, classes]
    seeds: tuple[int, ...]  # model init and data order of each model
    protocol: str
    shots: int | str
    transfer_seed: int
    val_fraction: float
    models_per_trial: int
    run_name: str

    @property
    def num_models(self) -> int:
        return len(self.seeds)

    def params(self, spec: StudySpec) -> dict:
        d = spec.datamodels
        return {"source": self.source, "task": self.task, "class_fraction": d.class_fraction,
                "seed": d.seed, "models_per_trial": self.models_per_trial, "protocol": self.protocol, "shots": self.shots,
                "transfer_seed": self.transfer_seed, "val_fraction": self.val_fraction, **self.settings,
                "model_config": self.model_config}


def model_seed(seed: int, index: int) -> int:
    return seed * MAX_DATAMODELS + index


def build_datamodel_plan(spec: StudySpec, data: dict) -> DatamodelPlan:
    """The sweep of a datamodels spec: masks from the class-subset view, checked against the data."""
    from orchestrator.plan import _kept_classes, _model_config, content_hash
    from datasets_ import validation_mask

    d = spec.datamodels
    src, task = data[f"sources.{d.source}"], data[f"tasks.{d.task}"]
    ref = spec.sources[d.source]
    settings = asdict(spec.pretrain.base)
    seeds = tuple(model_seed(d.seed, i) for i in range(d.num_models))
    masks = np.zeros((d.num_models, src.num_classes), dtype=bool)
    for i, s in enumerate(seeds):
        kept = _kept_classes(ref, src, d.class_fraction, s)
        masks[i, list(range(src.num_classes)) if kept is None else list(kept)] = True
    if masks.all(axis=0).all():
        raise SpecError("datamodels.class_fraction", f"{d.class_fraction:g} of the {src.num_classes} classes of '{d.source}' keeps every class")
    if d.shots != FULL:
        train = task.keys_and_labels("train")
        pool = train.labels[~validation_mask(train.keys, spec.transfer.val_fraction)]
        smallest = min(int((pool == c).sum()) for c in range(task.num_classes))
        if d.shots > smallest:
            raise SpecError("datamodels.shots", f"{d.shots} shots exceed the {smallest} training examples of the smallest class of task '{d.task}'")
    mcfg = _model_config(spec, settings)
    h = content_hash({"kind": KIND_DATAMODELS, "settings": settings, "model_config": mcfg, "source": src.fingerprint,
                      "keep": ref.keep_classes, "drop": ref.drop_classes, "class_fraction": d.class_fraction, "seed": d.seed,
                      "task": task.fingerprint, "protocol": d.protocol, "shots": d.shots, "transfer_seed": d.transfer_seed,
                      "val_fraction": spec.transfer.val_fraction})
    name = f"datamodels {d.source} -> {d.task} alpha={d.class_fraction:g} seed={d.seed}"
    return DatamodelPlan(h, d.source, str(src.root), d.task, str(task.root), tuple(src.classes), settings, mcfg, masks, seeds,
                         d.protocol, d.shots, d.transfer_seed, spec.transfer.val_fraction, d.models_per_trial, name)


# ---------------------------------------------------------------------------------------------
# The table: a Parquet dataset, one part per finished trial.


def table_uri(storage_path: str, study: str, config_hash: str) -> str:
    return f"{storage_path.rstrip('/')}/datamodels/{study}-{config_hash}"


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))


def _write_atomic(uri: str, name: str, write) -> str:
    """``write(sink)`` into ``uri/name``: aside and renamed on local disks, one PUT on object stores."""
    fs, root = _fs(uri)
    fs.create_dir(root, recursive=True)
    path = f"{root}/{name}"
    if "://" in uri:
        with fs.open_output_stream(path) as f:
            write(f)
        return path
    tmp = f"{root}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        write(f)
    fs.move(tmp, path)
    return path


def part_name(models) -> str:
    return f"{PART_PREFIX}{min(models):06d}-{max(models):06d}.parquet"


def write_part(uri: str, models, table: pa.Table) -> str:
    return _write_atomic(f"{uri.rstrip('/')}/{MODELS_DIR}", part_name(models), lambda f: pq.write_table(table, f))


def _parts(uri: str) -> list[str]:
    import pyarrow.fs

    fs, root = _fs(f"{uri.rstrip('/')}/{MODELS_DIR}")
    if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
    return sorted(i.path for i in infos if i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet"))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """Every finished model's row (sorted by model index), or None if no trial has finished."""
    fs, _ = _fs(uri)
    parts = [pq.read_table(p, columns=columns, filesystem=fs) for p in _parts(uri)]
    if not parts:
        return None
    t = pa.concat_tables(parts)
    return t.sort_by("model") if "model" in t.column_names else t


def finished_models(uri: str) -> set[int]:
    t = read_table(uri, ["model"])
    return set() if t is None else set(t.column("model").to_pylist())


def read_examples(uri: str) -> pa.Table | None:
    fs, root = _fs(uri)
    try:
        return pq.read_table(f"{root}/{EXAMPLES_FILE}", filesystem=fs)
    except (FileNotFoundError, OSError):
        return None


def read_sweep(uri: str) -> dict | None:
    fs, root = _fs(uri)
    try:
        with fs.open_input_stream(f"{root}/{SWEEP_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def _write_header(uri: str, plan: DatamodelPlan) -> None:
    """sweep.json and examples.parquet, once per table."""
    from datasets_ import open_dataset

    if read_sweep(uri) is None:
        doc = {"config_hash": plan.config_hash, "source": plan.source, "task": plan.task, "classes": list(plan.classes),
               "protocol": plan.protocol, "shots": plan.shots, "settings": plan.settings, "model_config": plan.model_config}
        _write_atomic(uri, SWEEP_FILE, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    if read_examples(uri) is None:
        test = open_dataset(plan.task_root).keys_and_labels("test")
        ex = pa.table({"example": np.arange(len(test.keys), dtype=np.int64), "key": test.keys.astype(str), "label": test.labels.astype(np.int64)})
        _write_atomic(uri, EXAMPLES_FILE, lambda f: pq.write_table(ex, f))


# ---------------------------------------------------------------------------------------------
# Trials: one Tune function trial trains, probes and records models_per_trial models.


@dataclass
class DatamodelContext:
    """What every trial needs, shipped once through the object store (see sweep.PhaseContext)."""

    study: str
    tracking_uri: str
    experiment_id: str
    storage_path: str
    sweep_run_id: str
    table: str
    plan: DatamodelPlan
    cpus_per_trial: float
    use_gpu: bool = False  # each trial holds a share of a GPU (resources.light_trial_gpus) and trains there
    trials: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mlflow_env: dict[str, str] = field(default_factory=dict, repr=False)
    fail_fast: bool = False  # stop the sweep at its first failed trial (sweep._run_phase reads it)
    deadline: float | None = None  # time.time() after which no trial starts (budget.max_hours)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def train_and_probe(plan: DatamodelPlan, models: tuple[int, ...], device=None) -> pa.Table:
    """Train the given models of the sweep at once on ``device`` (default CPU), probe each on
    the task: their table rows."""
    from datasets_ import open_dataset
    from datasets_.pipeline import decode_split
    from trainers.datamodels import TrainSettings, probe_outputs, stacked_features, train_stacked
    from trainers.features import Features

    s = plan.settings
    ts = TrainSettings(s["image_size"], s["epochs"], s["batch_size"], s["lr"], s["weight_decay"], s["lr_schedule"], s["warmup_epochs"])
    images, labels, keys = decode_split(open_dataset(plan.source_root), "train", ts.image_size)
    idx = list(models)
    sm = train_stacked(plan.model_config, len(plan.classes), images, labels, keys, plan.masks[idx], [plan.seeds[i] for i in idx], ts,
                       device)
    task = open_dataset(plan.task_root)
    feats = {}
    for split in ("train", "test"):
        x, y, k = decode_split(task, split, ts.image_size)
        feats[split] = (stacked_features(sm, x), y, k)
    rows = []
    for j, i in enumerate(idx):
        (ftr, ytr, ktr), (fte, yte, kte) = feats["train"], feats["test"]
        acc, out = probe_outputs(Features(ktr, ftr[j], ytr), Features(kte, fte[j], yte), task.num_classes, plan.protocol,
                                 plan.shots, plan.transfer_seed, plan.val_fraction)
        rows.append({"model": i, "seed": plan.seeds[i], "mask": plan.masks[i].tolist(), "num_train_samples": int(sm.num_train_samples[j]),
                     "train_loss": float(sm.train_loss[j]), "accuracy": acc,
                     "correct_prob": out["correct_prob"].to_numpy(np.float32), "margin": out["margin"].to_numpy(np.float32),
                     "prediction": out["prediction"].to_numpy(np.int32)})
    return pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)


TABLE_SCHEMA = pa.schema([
    ("model", pa.int64()), ("seed", pa.int64()), ("mask", pa.list_(pa.bool_())), ("num_train_samples", pa.int64()),
    ("train_loss", pa.float32()), ("accuracy", pa.float32()), ("correct_prob", pa.list_(pa.float32())),
    ("margin", pa.list_(pa.float32())), ("prediction", pa.list_(pa.int32())),
])


def _datamodel_trial(config: dict, ctx: DatamodelContext) -> dict:
    import torch

    from orchestrator.sweep import NOT_LAUNCHED

    if ctx.past_deadline():  # budget.max_hours: the table keeps what finished; a rerun goes on
        return {NOT_LAUNCHED: 1}
    apply_mlflow_client_env(ctx.mlflow_env)
    from trainers.devices import trial_device

    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    models = ctx.trials[config["trial"]]
    t0 = time.monotonic()
    table = train_and_probe(ctx.plan, models, trial_device(ctx.use_gpu))
    path = write_part(ctx.table, models, table)
    seconds = time.monotonic() - t0
    mean_acc = float(np.mean(table.column("accuracy").to_numpy()))
    tracker = Tracker(ctx.tracking_uri)
    name = f"models {min(models)}-{max(models)}"
    run_id = tracker.create_run(ctx.experiment_id, KIND_DATAMODEL_BATCH, ctx.study, name, f"{ctx.plan.config_hash}:{config['trial']}",
                                {"first_model": min(models), "last_model": max(models), "models": len(models)}, parent_run_id=ctx.sweep_run_id)
    tracker.log(run_id, metrics={"models": len(models), "seconds": seconds, "models_per_hour": 3600 * len(models) / seconds,
                                 "mean_accuracy": mean_acc})
    if "://" not in ctx.table:
        tracker.client.log_artifact(run_id, path, DATAMODEL_PART_ARTIFACT_DIR)
    tracker.finish(run_id)
    return {"models": len(models), "mean_accuracy": mean_acc, "seconds": seconds}


def _memory_line(plan: DatamodelPlan) -> str:
    """Each trial holds the source's training split decoded (uint8) in memory, for the stacked
    models' random access: say how much, so a source too large for a node is seen up front."""
    from datasets_ import open_dataset

    n = open_dataset(plan.source_root).num_samples("train")
    side = plan.settings["image_size"]
    return f"each trial decodes the source's {n:,} training images at {side}px into {n * 3 * side * side / 2**20:,.0f} MiB of memory"


def trial_batches(todo: list[int], per_trial: int) -> dict[str, tuple[int, ...]]:
    """Model indices still to do, cut into trials of ``per_trial`` (key: first-last index)."""
    out = {}
    for i in range(0, len(todo), per_trial):
        chunk = tuple(todo[i : i + per_trial])
        out[f"{chunk[0]:06d}-{chunk[-1]:06d}"] = chunk
    return out


@dataclass
class DatamodelOutcome:
    total: int
    done_before: int
    ran: int
    done: int
    failed: list[str]
    table: str
    not_launched: int = 0  # trials skipped past budget.max_hours

    def summary(self) -> str:
        return (f"datamodels: {self.done}/{self.total} models in the table {self.table} "
                f"({self.ran} trained now, {self.done_before} already there)")


def _sweep_run(tracker: Tracker, exp: str, spec: StudySpec, plan: DatamodelPlan, study_run: str, table: str) -> str:
    prior = tracker.runs_by_hash(exp, KIND_DATAMODELS).get(plan.config_hash)
    if prior is not None:
        tracker.reopen(prior.info.run_id)
        return prior.info.run_id
    return tracker.create_run(exp, KIND_DATAMODELS, spec.study, plan.run_name, plan.config_hash,
                              plan.params(spec),
                              parent_run_id=study_run, tags={TAG_DATAMODEL_TABLE: table})


def run_datamodels(spec: StudySpec, plan: DatamodelPlan, tracker: Tracker, exp: str, study_run: str, storage: str, cpus: float,
                   worker_uri: str, mlflow_env: dict, fail_fast: bool = False, deadline: float | None = None) -> DatamodelOutcome:
    """Train every model of the sweep the table lacks; record the sweep and its trials in MLflow."""
    from orchestrator.sweep import _run_phase

    table = table_uri(storage, spec.study, plan.config_hash)
    _write_header(table, plan)
    run_id = _sweep_run(tracker, exp, spec, plan, study_run, table)
    done = finished_models(table)
    todo = [i for i in range(plan.num_models) if i not in done]
    done_before = plan.num_models - len(todo)
    print(f"datamodels: {plan.num_models} models ({done_before} already in the table), {plan.models_per_trial} per trial; "
          f"{_memory_line(plan)}\ntable: {retry.redact(table)}", flush=True)
    r = spec.resources
    ctx = DatamodelContext(spec.study, worker_uri, exp, storage, run_id, table, plan, r.cpus_per_worker, r.use_gpu,
                           trial_batches(todo, plan.models_per_trial), mlflow_env, fail_fast, deadline)
    failed: list[str] = []
    not_launched = 0
    status = FAILED
    try:
        if ctx.trials:
            from orchestrator.sweep import cluster_gpus

            cluster = {"CPU": cpus, "GPU": cluster_gpus()}
            concurrency = r.max_concurrent_trials or r.light_concurrency(cluster, r.cpus_per_worker)
            labels = {k: f"models {v[0]}..{v[-1]} ({len(v)})" for k, v in ctx.trials.items()}
            progress = _run_phase("datamodels", _datamodel_trial, "trial", labels, ctx, r.light_trial(r.cpus_per_worker), concurrency,
                                  lambda x: f"{x.get('models', 0)} models in {x.get('seconds', 0):.1f}s, "
                                            f"mean accuracy {x.get('mean_accuracy', float('nan')):.3f}")
            failed = progress.errors
            not_launched = progress.not_launched
        now = finished_models(table)
        status = (FINISHED if len(now & set(range(plan.num_models))) == plan.num_models
                  else KILLED if not_launched and not failed else FAILED)
    finally:
        n_done = len(finished_models(table) & set(range(plan.num_models)))
        step = len(tracker.client.get_metric_history(run_id, "models_done"))
        tracker.log(run_id, metrics={"models_done": n_done, "models_total": plan.num_models, "failed_trials": len(failed)}, step=step)
        tracker.finish(run_id, status)
    return DatamodelOutcome(plan.num_models, done_before, n_done - done_before, n_done, failed, table, not_launched)
