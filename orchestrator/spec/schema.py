"""The study spec's dataclasses. Each field that a study file sets is declared once, with
:func:`~orchestrator.spec.fields.spec_field`: its default, the reader that checks its YAML value,
and what it means. Fields whose reading depends on other fields (``datamodels.source`` must name
a source, a search's ``eval_every`` is at most ``transfer.finetune.steps`` ...) declare no reader
here; :mod:`orchestrator.spec.parse` reads them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from datasets_.views import NOISE_PATTERNS
from orchestrator.spec.claims import ClaimSpec
from orchestrator.spec.fields import (
    SpecError,
    boolean,
    choice,
    data_uri,
    int_in,
    integer,
    list_of,
    listed,
    name,
    number,
    number_in,
    positive_number,
    section,
    short,
    spec_field,
    string,
    typename,
)
from trainers.protocols import FINAL_LAYER, FROZEN_PROTOCOLS, FULL, METHODS, PROTOCOLS

LR_SCHEDULES = ("cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PACK_MODES = ("auto", "off")
SEARCH_ALGORITHMS = ("random", "asha")
OVERLAP_MODES = ("off", "warn", "error")
COUNTERFACTUAL_ARMS = ("harmful", "helpful", "random")
COLUMN_KEYS = ("image_column", "label_column", "caption_column", "key_column")  # raw Parquet sources and tasks
LIGHT_TRIAL_GPUS = 0.25
MAX_DATAMODELS = 1_000_000  # model seeds are seed * MAX_DATAMODELS + index
DEFAULT_STORAGE = "transferlab_storage"  # storage_path when neither the study nor --storage-path sets one


# ---------------------------------------------------------------------------------------------
# Readers of single fields.


def _model_name(path: str, v: Any) -> str:
    """A name of :data:`trainers.models.MODELS`, or ``timm:NAME`` with a model timm knows."""
    from trainers.models import MODELS, TIMM_PREFIX, check_timm_name  # imports torch: only when read

    if isinstance(v, str) and v.startswith(TIMM_PREFIX):
        try:
            return check_timm_name(v)
        except ValueError as e:
            raise SpecError(path, str(e)) from None
    return choice((*sorted(MODELS), f"{TIMM_PREFIX}NAME"))(path, v)


def _size_or_full(path: str, v: Any) -> int | None:
    if v == FULL or v is None:
        return None
    return integer(path, v, minimum=1)


def _shots(path: str, v: Any) -> int | str:
    if v == FULL:
        return FULL
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(path, f"must be a positive integer or 'full', got {typename(v)} {short(v)}")
    return integer(path, v, minimum=1)


def _class_fraction(path: str, v: Any) -> float:
    v = number(path, v, lo=0.0, hi=1.0)
    if v == 0.0:
        raise SpecError(path, "must be in (0, 1], got 0")
    return v


def _datamodel_fraction(path: str, v: Any) -> float:
    v = _class_fraction(path, v)
    if v == 1.0:
        raise SpecError(path, "must be below 1: models that all see every class say nothing about any class")
    return v


def _class_name(path: str, v: Any) -> str:
    # YAML reads class 7 as an int; class names are strings.
    return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else string(path, v)


def _regex(path: str, v: Any) -> str:
    v = string(path, v)
    try:
        re.compile(v)
    except re.error as e:
        raise SpecError(path, f"invalid regular expression {short(v)}: {e}") from None
    return v


def _overlap_mode(path: str, v: Any) -> str:
    # YAML 1.1 reads a bare `off` as false: take it as the word the user wrote.
    return choice(OVERLAP_MODES)(path, "off" if v is False else v)


def _log_range(path: str, v: Any) -> tuple[float, float]:
    if not isinstance(v, list) or len(v) != 2:
        raise SpecError(path, f"must be a range [lo, hi], got {typename(v)} {short(v)}")
    lo, hi = positive_number(f"{path}[0]", v[0]), positive_number(f"{path}[1]", v[1])
    if not lo < hi:
        raise SpecError(path, f"lo must be below hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def _number_or_log_range(path: str, v: Any) -> float | tuple[float, float]:
    return _log_range(path, v) if isinstance(v, list) else number(path, v, lo=0.0)


def _optional_decay(path: str, v: Any) -> float | None:
    return None if v is None else number(path, v, lo=0.0)


def _gpu_share(path: str, v: Any) -> float:
    share = number(path, v)
    if not 0 < share <= 1:
        raise SpecError(path, f"must be in (0, 1] (a share of one GPU), got {share:g}")
    return share


def _remove_top(path: str, v: Any) -> tuple[int, ...]:
    return tuple(sorted(listed(path, v, int_in(1))))


# ---------------------------------------------------------------------------------------------
# The spec.


@dataclass(frozen=True)
class DataRef:
    """A named dataset: ``uri`` is ``builtin:NAME``, a prepared dataset (directory or object
    store), or a raw source read as it is (image folder, WebDataset tars, Parquet); for Parquet,
    ``columns`` names the image / label / caption / key columns (``image_column: png`` ...).

    Sources may be curated: only ``keep_classes`` / all but ``drop_classes`` (class names), and
    only samples whose caption matches ``caption_matches`` and not ``caption_excludes`` (regexes).
    Tasks take ``uri``, ``allow_compressed`` and the column keys only.
    """

    name: str
    uri: str = spec_field(read=data_uri)
    keep_classes: tuple[str, ...] | None = spec_field(None, read=list_of(_class_name))
    drop_classes: tuple[str, ...] = spec_field((), read=list_of(_class_name))
    caption_matches: str | None = spec_field(None, read=_regex)
    caption_excludes: str | None = spec_field(None, read=_regex)
    # gzip/bzip2/xz tars are refused unless allowed: a few kB of them can unpack to gigabytes
    allow_compressed: bool = spec_field(False, read=boolean)
    # what the readers are given: raw Parquet column names ({image_column: ..., label_column: ...}),
    # and allow_compressed when true
    columns: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainSettings:
    """Settings of one pretraining run. Each may also be swept under ``pretrain.sweep``."""

    # supervised (cross-entropy) | clip (image-text) | simclr (image-image)
    method: str = spec_field("supervised", read=choice(METHODS))
    model: str = spec_field("small-cnn", read=_model_name)  # a name from trainers.models.MODELS, or timm:NAME
    width: float = spec_field(1.0, read=positive_number)  # multiplies the channel widths of the CNNs and vit-tiny
    # images are resized to image_size x image_size, 3 channels
    image_size: int = spec_field(32, read=int_in(8, 4096))
    epochs: int = spec_field(2, read=int_in(1, 100_000))  # passes over the pretraining subset
    batch_size: int = spec_field(64, read=int_in(1))  # global: each of W workers takes batch_size // W
    lr: float = spec_field(2e-3, read=positive_number)  # peak learning rate (AdamW)
    weight_decay: float = spec_field(5e-4, read=number_in(0.0))
    # weight decay of the parameters outside the backbone (the supervised classifier head, SimCLR's
    # projector, CLIP's projection and text tower); None: weight_decay. Abnar et al.'s arm where
    # upstream and downstream accuracy disagree. In the config hash only when set.
    head_weight_decay: float | None = spec_field(None, read=_optional_decay)
    lr_schedule: str = spec_field("cosine", read=choice(LR_SCHEDULES))  # cosine decay to 0 after warm-up, or constant
    warmup_epochs: float = spec_field(0.0, read=number_in(0.0))
    amp: str = spec_field("none", read=choice(AMP_MODES))  # mixed precision on CUDA: none | bf16 | fp16
    # label noise: symmetric (any other class) | pairwise (next class)
    noise_pattern: str = spec_field("symmetric", read=choice(NOISE_PATTERNS))
    # pretrain_size subsets with (nearly) equal samples per class
    class_balanced: bool = spec_field(False, read=boolean)
    # log train_loss_step (rank 0's batch loss) every this many optimizer steps; not in the config
    # hash: it changes what is recorded, not what is computed
    log_every_steps: int = spec_field(10, read=int_in(1))

    def hashed(self) -> dict:
        """The settings that decide a run's result (what its config hash covers): all but
        ``log_every_steps``, and ``head_weight_decay`` only when set (so runs from before it
        existed keep their hashes)."""
        out = {k: v for k, v in asdict(self).items() if k != "log_every_steps"}
        if out["head_weight_decay"] is None:
            del out["head_weight_decay"]
        return out


@dataclass(frozen=True)
class ViewAxes:
    """The axes of ``pretrain.sweep`` besides ``source`` and the :class:`PretrainSettings`: which
    data of the source a run sees. Every grid holds each of them, at the default here when the
    grid leaves it out. Only the grid reader uses this class."""

    pretrain_size: int | None = spec_field(None, read=_size_or_full)  # samples drawn from the source; None: 'full'
    label_noise: float = spec_field(0.0, read=number_in(0.0, 1.0))  # share of labels replaced
    seed: int = spec_field(0, read=int_in(0))
    class_fraction: float = spec_field(1.0, read=_class_fraction)  # share of the source's classes kept
    caption_noise: float = spec_field(0.0, read=number_in(0.0, 1.0))  # clip: share of captions swapped


@dataclass(frozen=True)
class PretrainSpec:
    """``pretrain.sweep`` is one grid (axis -> values) or a list of grids whose points are united.
    ``sweep`` is every axis's values over all grids (a grid without the axis adds the base value)."""

    base: PretrainSettings
    sweep: dict[str, tuple]  # axis -> values; always has source and every ViewAxes axis
    grids: tuple[dict[str, tuple], ...] = ()  # each has the same always-present axes as sweep
    listed: bool = False  # the YAML gave a list of grids: fields read pretrain.sweep[i]
    # auto: small single-worker runs of one model shape train several at once in one trial
    # (trainers.packed; results as if alone, config hashes unchanged); off: one TorchTrainer each
    pack: str = spec_field("auto", read=choice(PACK_MODES))

    def __post_init__(self):
        if not self.grids:  # built by hand from one grid
            object.__setattr__(self, "grids", (self.sweep,))

    def grid_path(self, i: int) -> str:
        return f"pretrain.sweep[{i}]" if self.listed else "pretrain.sweep"


@dataclass(frozen=True)
class FinetuneSearch:
    """A Ray Tune search over the fine-tuning hyperparameters of each finetune / lp_ft fit, in
    place of the ``lr`` grid (orchestrator.search). ``num_samples`` configs are drawn
    log-uniformly from the ranges (seeded by ``seed``); each trains up to ``transfer.finetune.steps``
    steps and reports validation accuracy every ``eval_every`` steps; ``asha`` stops the worse
    configs at rungs ``grace_steps`` × ``reduction_factor``^k. The best on validation is retrained
    and scored on test."""

    algorithm: str = spec_field(read=choice(SEARCH_ALGORITHMS))  # random | asha
    num_samples: int = spec_field(8, read=int_in(1, 10_000))
    lr: tuple[float, float] = spec_field((1e-4, 1e-1), read=_log_range)  # [lo, hi], sampled log-uniformly
    # a fixed number, or [lo, hi] sampled log-uniformly (parsed default: transfer.finetune.weight_decay)
    weight_decay: float | tuple[float, float] = spec_field(1e-4, read=_number_or_log_range)
    # steps between validation reports, at most transfer.finetune.steps (parsed default: grace_steps)
    eval_every: int = spec_field(25)
    # asha: steps before a config can be stopped, at most transfer.finetune.steps (parsed default: steps // 4)
    grace_steps: int = spec_field(25)
    # asha: 1 in reduction_factor configs goes on at each rung
    reduction_factor: int = spec_field(2, read=int_in(2, 100))
    seed: int = spec_field(0, read=int_in(0))  # of the sampler
    # default: one per cluster CPU; 1 makes asha deterministic
    max_concurrent_trials: int | None = spec_field(None, read=int_in(1, 10_000))


@dataclass(frozen=True)
class FinetuneSpec:
    """Settings of the finetune and lp_ft protocols (see trainers.transfer.FinetuneSettings)."""

    # a grid: the learning rate with the best validation accuracy wins
    lr: tuple[float, ...] = spec_field((1e-3, 1e-2), read=list_of(positive_number))
    steps: int = spec_field(100, read=int_in(1))  # AdamW steps on the shots (with a search: each trial's maximum)
    batch_size: int = spec_field(32, read=int_in(1))
    weight_decay: float = spec_field(1e-4, read=number_in(0.0))
    search: FinetuneSearch | None = spec_field(None)  # a Tune search instead of the lr grid
    # Which pretraining runs are fine-tuned: axis -> values of pretrain.sweep (e.g. {label_noise:
    # [0.0], pretrain_size: [500, 4000]}); a run is fine-tuned when it matches every axis given.
    # Empty: every run. The linear probes still cover every run.
    only: dict = spec_field(default_factory=dict)
    tasks: tuple[str, ...] = spec_field(())  # tasks fine-tuned on (of transfer.tasks); empty: all
    seeds: tuple[int, ...] | None = spec_field(None)  # few-shot draws fine-tuned (of transfer.seeds); None: all


@dataclass(frozen=True)
class TransferSpec:
    protocol: tuple[str, ...] = spec_field(("linear_probe",), read=list_of(choice(PROTOCOLS)))
    # examples per class, or 'full' (the whole training pool)
    shots: tuple = spec_field((1, 5, 10, FULL), read=list_of(_shots))
    seeds: tuple[int, ...] = spec_field((0,), read=list_of(int_in(0)))  # few-shot sampling seeds; 'full' is fitted once
    tasks: tuple[str, ...] = spec_field(())  # names from the study's tasks to evaluate on; empty = all
    # share of each task's train split held out to choose the probe's L2
    val_fraction: float = spec_field(0.2, read=number_in(0.01, 0.9))
    # backbone layers the frozen-feature probes read (layer-wise analysis)
    layers: tuple[str, ...] = spec_field((FINAL_LAYER,), read=list_of(name))
    finetune: FinetuneSpec = spec_field(default_factory=FinetuneSpec)


@dataclass(frozen=True)
class Resources:
    workers: int = spec_field(1, read=int_in(1))  # Ray Train workers per pretraining run
    cpus_per_worker: float = spec_field(1.0, read=positive_number)
    use_gpu: bool = spec_field(False, read=boolean)
    # GPU share of each transfer and datamodel trial (light work) when use_gpu: 0.25 packs four
    # of them on a GPU. None = LIGHT_TRIAL_GPUS.
    light_trial_gpus: float | None = spec_field(None, read=_gpu_share)
    max_concurrent_trials: int | None = spec_field(None, read=int_in(1))  # default: derived from the cluster's CPUs
    # restarts of a pretraining run's workers (from the last checkpoint)
    max_failures: int = spec_field(2, read=int_in(0))

    def light_trial(self, cpus: float = 1.0) -> dict[str, float]:
        """The Ray resources of one transfer or datamodel trial: ``cpus``, and its GPU share
        when the study uses GPUs (fractional, so several small trials share one device)."""
        if not self.use_gpu:
            return {"CPU": cpus}
        return {"CPU": cpus, "GPU": self.light_trial_gpus or LIGHT_TRIAL_GPUS}

    def light_concurrency(self, cluster: dict, cpus: float = 1.0) -> int:
        """Light trials the cluster (``ray.cluster_resources()``-shaped) holds at once."""
        need = self.light_trial(cpus)
        fits = min(cluster.get(k, 0.0) / v for k, v in need.items())
        return max(1, int(math.floor(fits + 1e-9)))


@dataclass(frozen=True)
class CounterfactualSpec:
    """``datamodels.counterfactual``: after the sweep, plan and run the follow-up study that
    removes the K most harmful / helpful / random classes (``transferlab counterfactual``)."""

    remove_top: tuple[int, ...] = spec_field(read=_remove_top)  # the Ks, ascending
    arms: tuple[str, ...] = spec_field(COUNTERFACTUAL_ARMS, read=list_of(choice(COUNTERFACTUAL_ARMS)))
    seeds: int = spec_field(3, read=int_in(1, 1000))  # pretraining seeds of each follow-up source


INFLUENCE_OUTPUTS = ("margin", "correct_prob")  # per-example outputs a datamodel table records


@dataclass(frozen=True)
class DatamodelSpec:
    """A datamodel sweep (Jain et al.): ``num_models`` supervised models with the ``pretrain``
    settings, model i on a random ``class_fraction`` of ``source``'s classes (seeded by ``seed``
    and i), each probed on ``task``. ``models_per_trial`` models train at once in one process."""

    source: str = spec_field()  # a name from the study's sources
    task: str = spec_field()  # a name from the study's tasks
    num_models: int = spec_field(read=int_in(2, MAX_DATAMODELS))
    class_fraction: float = spec_field(0.5, read=_datamodel_fraction)
    seed: int = spec_field(0, read=int_in(0, 2000))
    models_per_trial: int = spec_field(16, read=int_in(1, 4096))
    # frozen-feature probe: linear_probe | logistic
    protocol: str = spec_field("linear_probe", read=choice(FROZEN_PROTOCOLS))
    shots: int | str = spec_field(FULL, read=_shots)  # examples per class of the probe, or 'full'
    transfer_seed: int = spec_field(0, read=int_in(0))  # few-shot draw of the probe
    # the per-example output influence is read from: margin (true-class logit minus the largest
    # other; unbounded, so it keeps separating examples a full-pool probe gets right) | correct_prob
    influence_on: str = spec_field("margin", read=choice(INFLUENCE_OUTPUTS))
    # run the follow-up study right after the sweep
    counterfactual: CounterfactualSpec | None = spec_field(None, read=section(CounterfactualSpec))


@dataclass(frozen=True)
class Budget:
    """Limits on one ``transferlab run`` (``plan``/``validate``/``run`` refuse a study over them)."""

    # Ray Tune trials the run may launch (pretraining + transfer)
    max_trials: int | None = spec_field(None, read=int_in(1))
    # estimated wall time; at run time no trial starts after it
    max_hours: float | None = spec_field(None, read=positive_number)


@dataclass(frozen=True)
class StudySpec:
    study: str = spec_field(read=name)  # also the MLflow experiment name
    sources: dict[str, DataRef] = spec_field()
    tasks: dict[str, DataRef] = spec_field()
    pretrain: PretrainSpec = spec_field()
    transfer: TransferSpec = spec_field()
    resources: Resources = spec_field(default_factory=Resources)
    # default: MLflow's default store in the working directory
    tracking_uri: str | None = spec_field(None, read=string)
    storage_path: str | None = spec_field(None, read=data_uri)  # checkpoints; default ./DEFAULT_STORAGE
    # leakage check source train vs task test: off | warn | error
    preflight_overlap: str = spec_field("off", read=_overlap_mode)
    datamodels: DatamodelSpec | None = spec_field(None)  # a datamodel sweep instead of the pretraining grid
    budget: Budget = spec_field(default_factory=Budget, read=section(Budget))
    # pre-registered hypotheses `transferlab report` judges (orchestrator.spec.claims); empty: the defaults
    claims: tuple[ClaimSpec, ...] = spec_field(())
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the YAML document, as loaded

    @property
    def transfer_tasks(self) -> tuple[str, ...]:
        return self.transfer.tasks or tuple(self.tasks)
