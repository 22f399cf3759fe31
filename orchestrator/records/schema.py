"""The MLflow schema of transferlab, in one place: every tag, param, metric and artifact name.

A leaf module: it imports nothing of transferlab, so every layer may import it.

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
           label_noise, model, seed`` + the       epoch (step = epoch); ``train_loss_step``:
           other settings (``image_size,          rank 0's batch loss every ``log_every_steps``
           epochs, batch_size, lr, ...``;         optimizer steps (step = global optimizer
           ``head_weight_decay`` when set),       step); ``upstream_accuracy``
           ``class_fraction`` when swept,
           ``caption_noise`` (clip runs) and      on the source's held-out (test) split, restricted
           ``view_fingerprint``                   to the classes the run trained on (supervised:
                                                  top-1 of its head; clip: zero-shot top-1 with
                                                  "a photo of a {class}." prompts of every source
                                                  class; simclr: k-NN top-1 against its training
                                                  features), ``realized_label_noise`` (fraction
                                                  of labels actually flipped),
                                                  ``num_train_samples``; clip runs with caption
                                                  noise: ``realized_caption_noise`` per epoch
                                                  (share of captions swapped), ``trial_seconds``
                                                  (wall time of the trial that finished it);
                                                  ``system/...`` (MLflow's system metrics:
                                                  CPU, memory, disk, network, GPU, sampled
                                                  while it trains; orchestrator.records.
                                                  system_metrics)
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

Searched fits (``transfer.finetune.search``, orchestrator.execution.search) carry the search's settings as
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
added: arm ``harmful|helpful|random|baseline``, K and the removed classes; ``influence_split``:
which examples the ranking's outputs were on, ``influence_holdout`` or ``test``) on the study run
too.

Datamodel studies (a ``datamodels:`` section) replace the pretrain/transfer levels with two:
a ``datamodels`` run under the study run (params: ``source, task, class_fraction,
seed, models_per_trial, protocol, shots, transfer_seed, val_fraction, influence_fraction,
outputs_split`` + the pretraining settings; tag ``transferlab.datamodel_table``: where the table
lives; metrics ``models_done``, ``models_total`` (the spec's ``num_models``: a rerun with more extends the sweep),
``failed_trials``, one step per ``run``), and one ``datamodel_batch`` run per
finished trial under it (params ``first_model, last_model, models``; metrics ``models``,
``seconds``, ``models_per_hour``, ``mean_accuracy``; the trial's table part as artifact under
``datamodels/``). Thousands of models are rows of the table, not MLflow runs. The **table** is
a Parquet dataset (``TABLE/models/``, readable as one table by ``pandas.read_parquet``), one
file per finished trial (``models-FIRST-LAST.parquet``, written atomically), one row per model:
``model`` (index), ``seed``, ``mask`` (list of bool, one per source class), ``num_train_samples``,
``train_loss``, ``accuracy`` and per-target-example lists ``correct_prob``, ``margin``,
``prediction`` (position i = row i of ``examples.parquet``), all on the **influence holdout**
(``outputs_split`` = ``influence_holdout``): the ``influence_fraction`` (0.2) of the task's
*train* split picked by key hash (:func:`datasets_.views.influence_holdout`); each model's probe
trains and selects on the rest, and the task's test split is left to score the counterfactual
follow-up. Beside ``models/``, ``examples.parquet`` (``example``: position in the task's train
split, ``key``, ``label``) and ``sweep.json`` (class names, config hash, settings,
``outputs_split``, ``influence_fraction``). A table whose ``sweep.json`` lacks ``outputs_split``
was written before the holdout: its outputs are on the task's test split.

Every transfer run also carries its pretraining run's settings that vary across studies, as
params: ``source, method, pretrain_size, label_noise, model, width, epochs, class_fraction,
caption_noise`` (clip runs) and ``pretrain_seed`` (the pretraining seed; ``seed`` is the few-shot
draw), so the runs table filters and compares ``accuracy`` against them directly.

The experiment is tagged ``mlflow.experimentKind = custom_model_development`` (MLflow opens it on
its runs table) and ``mlflow.note.content``: the study's question, grid and how to read it. The
study run stores the study file as it ran (overrides and ``--quick`` applied, data paths
resolved) as the artifact ``spec/study.yaml``.

Provenance tags on every run: ``mlflow.user``, ``mlflow.source.name`` (``transferlab``),
``mlflow.source.git.commit`` and ``transferlab.git_dirty`` (whether tracked files differed from
the commit; absent outside git), ``transferlab.version``, ``transferlab.code_digest`` (a digest of
the code that decides results — trainers/ and datasets_/, comments, docstrings and formatting
left out: ``transferlab plan`` counts the cached results another code computed).

Tags on every run: ``transferlab.kind`` (study|pretrain|transfer), ``transferlab.study``,
``transferlab.config_hash`` (hash of everything that determines the result: a finished run with
this hash means the job is done), ``mlflow.runName``. Pretrain runs also carry
``transferlab.checkpoint`` (the checkpoint directory transfer runs read) and
``transferlab.model_id``: the checkpoint as an MLflow logged model (PyTorch format, the run its
source, ``model_type`` ``pretrained``; :mod:`orchestrator.records.models`), which every transfer
run fitted on it names as its model input. ``pretrain_size`` is
``full`` when the whole source is used; ``shots`` is ``full`` for the whole training pool.

Run status: FINISHED means done (the job is skipped next time). FAILED: the trial failed, or
the run was left RUNNING by a driver that died and no later ``run`` resumed it (superseded, or
no longer in the grid). KILLED: ``transferlab run`` stopped it on purpose (``budget.max_hours``
reached, ``--fail-fast``). FAILED and KILLED runs whose job is still in the grid are reopened,
with the same run id, by the next ``run``. One ``transferlab run`` drives a study at a time:
it holds the experiment tag ``transferlab.driver_lease`` (JSON: ``driver`` id, ``host``, ``pid``,
``since`` and ``heartbeat`` as Unix seconds; "" when released) while it runs
(:mod:`orchestrator.records.lease`).

Several FINISHED runs with one config hash (computed again by ``run --rerun-changed`` because
another code computed the first, or left by drivers that ran a study at once before the lease
existed) are one result: the analysis keeps the newest (latest end time), and ``run`` tags each
older one ``transferlab.superseded_by`` = the id of the run that stands for the job. Nothing is
deleted: an older run keeps its metrics, artifacts and checkpoint, and says which run replaced it.
"""

TAG_KIND = "transferlab.kind"
TAG_STUDY = "transferlab.study"
TAG_CONFIG_HASH = "transferlab.config_hash"
TAG_CHECKPOINT = "transferlab.checkpoint"
TAG_MODEL_ID = "transferlab.model_id"  # on a pretrain run: its checkpoint's logged model (records.models)
# On a FINISHED run whose job a newer FINISHED run stands for (run --rerun-changed): that run's id.
TAG_SUPERSEDED_BY = "transferlab.superseded_by"
TAG_DRIVER_LEASE = "transferlab.driver_lease"  # on the experiment (orchestrator.records.lease)
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
# Provenance, on every run (orchestrator.records.provenance).
TAG_USER, TAG_SOURCE_NAME = "mlflow.user", "mlflow.source.name"
TAG_GIT_COMMIT, TAG_GIT_DIRTY = "mlflow.source.git.commit", "transferlab.git_dirty"
TAG_CODE_VERSION = "transferlab.version"
TAG_CODE_DIGEST = "transferlab.code_digest"  # of the code that decides results (trainers/, datasets_/)
# The experiment: MLflow opens a custom-model experiment on its runs table, with this description.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_NOTE_TAG = "mlflow.note.content"
SPEC_ARTIFACT = "spec/study.yaml"

KIND_STUDY, KIND_PRETRAIN, KIND_TRANSFER = "study", "pretrain", "transfer"
KIND_DATAMODELS, KIND_DATAMODEL_BATCH = "datamodels", "datamodel_batch"
TAG_DATAMODEL_TABLE = "transferlab.datamodel_table"
# Which examples per-example outputs are on: a param of the datamodels run and a field of sweep.json.
PARAM_OUTPUTS_SPLIT = "outputs_split"
OUTPUTS_INFLUENCE_HOLDOUT = "influence_holdout"  # held out of the task's train split, seen by no probe
OUTPUTS_TEST = "test"  # the task's test split: transfer runs; datamodel tables without the field
DATAMODEL_PART_ARTIFACT_DIR = "datamodels"

PRETRAIN_PARAMS = ("method", "source", "pretrain_size", "label_noise", "model", "seed")
# The pretraining settings that, with PRETRAIN_PARAMS but the seed, tell configurations apart (the
# analysis averages a configuration's seeds); head_weight_decay is a param only when set.
PRETRAIN_SETTING_PARAMS = (
    "width",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "head_weight_decay",
    "lr_schedule",
    "warmup_epochs",
)
TRANSFER_PARAMS = ("task", "protocol", "shots", "seed", "layer")

METRIC_TRAIN_LOSS = "train_loss"
METRIC_TRAIN_LOSS_STEP = "train_loss_step"  # step = global optimizer step (pretrain runs)
METRIC_UPSTREAM_ACCURACY = "upstream_accuracy"
METRIC_ACCURACY = "accuracy"
METRIC_MEAN_PER_CLASS_ACCURACY = "mean_per_class_accuracy"
METRIC_NUM_TRAIN_SAMPLES = "num_train_samples"
PARAM_CLASS_FRACTION = "class_fraction"
METRIC_TRIAL_SECONDS = "trial_seconds"
# runs trained in one packed trial (trainers.packed); their trial_seconds is the pack's over this
METRIC_PACK_SIZE = "pack_size"

VIEW_MASK_ARTIFACT = "view/class_mask.json"
PER_EXAMPLE_ARTIFACT = "outputs/per_example.parquet"
REPORT_ARTIFACT_DIR = "report"
COUNTERFACTUAL_PLAN_ARTIFACT = "counterfactual/plan.json"

FINISHED, FAILED, RUNNING, KILLED = "FINISHED", "FAILED", "RUNNING", "KILLED"
