"""The study spec: YAML in, a typed and validated :class:`StudySpec` out.

Every problem is reported as a :class:`SpecError` whose message starts with the dotted path of
the offending field (``pretrain.sweep.label_noise[1]: must be in [0, 1], got 1.5``). Only
:func:`yaml.safe_load` reads the file, so YAML tags cannot construct objects.

A minimal study::

    study: quickstart
    sources:   {mnist: {uri: "builtin:mnist"}}
    tasks:     {digits: {uri: "builtin:digits"}}
    pretrain:
      method: supervised
      model: small-cnn
      image_size: 32
      epochs: 2
      sweep: {source: [mnist], pretrain_size: [500, 2000], label_noise: [0.0, 0.4], seed: [0]}
    transfer:
      protocol: [linear_probe]
      shots: [1, 5, 10, full]
      seeds: [0, 1, 2]
    resources: {workers: 1, cpus_per_worker: 1, use_gpu: false}
    tracking_uri: null
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

FULL = "full"
METHODS = ("supervised", "clip", "simclr")
PROTOCOLS = ("linear_probe", "logistic", "finetune", "lp_ft", "zero_shot")
LR_SCHEDULES = ("cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
NOISE_PATTERNS = ("symmetric", "pairwise")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SpecError(ValueError):
    """A study spec problem, phrased as ``FIELD: what is wrong``."""

    def __init__(self, field_path: str, problem: str):
        self.field = field_path
        super().__init__(f"{field_path}: {problem}")


# ---------------------------------------------------------------------------------------------
# Field readers: each returns the checked value or raises SpecError naming the field.


def _typename(v: Any) -> str:
    return "null" if v is None else {"dict": "mapping", "list": "list", "str": "string"}.get(type(v).__name__, type(v).__name__)


_INT_MAX = 2**31 - 1  # no count or seed in a study is larger; bigger ints are typos or attacks


def _int(path: str, v: Any, minimum: int | None = None, maximum: int = _INT_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(path, f"must be an integer, got {_typename(v)} {_short(v)}")
    if minimum is not None and v < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {_short(v)}")
    if v > maximum:
        raise SpecError(path, f"must be <= {maximum}, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    """repr of a value, cut to fit one error line (values may be huge or hostile)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _float(path: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(path, f"must be a number, got {_typename(v)} {_short(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise SpecError(path, f"must be a finite number, got {_short(v)}") from None
    if v != v:
        raise SpecError(path, "must be a number, got NaN")
    if v in (float("inf"), float("-inf")):
        raise SpecError(path, f"must be a finite number, got {v}")
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise SpecError(path, f"must be in [{lo:g}, {hi:g}], got {v:g}")
    if lo is not None and v < lo:
        raise SpecError(path, f"must be >= {lo:g}, got {v:g}")
    return v


def _positive_float(path: str, v: Any) -> float:
    v = _float(path, v)
    if v <= 0:
        raise SpecError(path, f"must be > 0, got {v:g}")
    return v


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(path, f"must be true or false, got {_typename(v)} {_short(v)}")
    return v


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise SpecError(path, f"must be a non-empty string, got {_typename(v)} {_short(v)}")
    return v


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def read(path: str, v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            hint = difflib.get_close_matches(str(v), options, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SpecError(path, f"unknown value {_short(v)}{extra}; choose from: {', '.join(options)}")
        return v

    return read


def _overlap_mode(path: str, v: Any) -> str:
    # YAML 1.1 reads a bare `off` as false: take it as the word the user wrote.
    return _choice(("off", "warn", "error"))(path, "off" if v is False else v)


def _size_or_full(path: str, v: Any) -> int | None:
    if v == FULL or v is None:
        return None
    return _int(path, v, minimum=1)


def _shots(path: str, v: Any) -> int | str:
    if v == FULL:
        return FULL
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(path, f"must be a positive integer or 'full', got {_typename(v)} {_short(v)}")
    return _int(path, v, minimum=1)


def _name(path: str, v: Any) -> str:
    v = _str(path, v)
    if len(v) > 128:
        raise SpecError(path, f"must be at most 128 characters, got {len(v)}")
    if not _NAME.match(v):
        raise SpecError(path, f"{_short(v)} may hold only letters, digits, '_', '.', '-' and must start with a letter or digit")
    return v


def _list(path: str, v: Any, item: Callable[[str, Any], Any]) -> tuple:
    if not isinstance(v, list):
        v = [v]  # a scalar is a one-element grid
    if not v:
        raise SpecError(path, "must not be empty")
    out = tuple(item(f"{path}[{i}]", x) for i, x in enumerate(v))
    seen = set()
    for i, x in enumerate(out):
        if x in seen:
            raise SpecError(f"{path}[{i}]", f"duplicate value {_short(v[i])}")
        seen.add(x)
    return out


class _Mapping:
    """One YAML mapping, read key by key; :meth:`done` rejects keys nobody asked for."""

    def __init__(self, path: str, data: Any, allowed: tuple[str, ...]):
        if not isinstance(data, dict):
            raise SpecError(path or "study file", f"must be a mapping, got {_typename(data)}")
        for k in data:
            if not isinstance(k, str):
                raise SpecError(self._join(path, str(k)), "keys must be strings")
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(allowed)}"
                raise SpecError(self._join(path, k), f"unknown key{extra}")
        self.path, self.data = path, data

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def at(self, key: str) -> str:
        return self._join(self.path, key)

    def get(self, key: str, read: Callable[[str, Any], Any], default: Any = ..., nullable: bool = False):
        if key not in self.data or (self.data[key] is None and not nullable):
            if default is ...:
                raise SpecError(self.at(key), "is required")
            return default
        if self.data[key] is None:
            return None
        return read(self.at(key), self.data[key])


# ---------------------------------------------------------------------------------------------
# The spec itself.


@dataclass(frozen=True)
class DataRef:
    """A named dataset: ``uri`` is ``builtin:NAME``, a prepared dataset (directory or object
    store), or a raw source read as it is (image folder, WebDataset tars, Parquet); for Parquet,
    ``columns`` names the image / label / caption / key columns (``image_column: png`` ...).

    Sources may be curated: only ``keep_classes`` / all but ``drop_classes`` (class names), and
    only samples whose caption matches ``caption_matches`` and not ``caption_excludes`` (regexes).
    """

    name: str
    uri: str
    keep_classes: tuple[str, ...] | None = None
    drop_classes: tuple[str, ...] = ()
    caption_matches: str | None = None
    caption_excludes: str | None = None
    columns: dict = field(default_factory=dict)  # raw Parquet: {image_column: ..., label_column: ...}


_COLUMN_KEYS = ("image_column", "label_column", "caption_column", "key_column")


@dataclass(frozen=True)
class PretrainSettings:
    """Settings of one pretraining run. Each may also be swept under ``pretrain.sweep``."""

    method: str = "supervised"  # supervised (cross-entropy) | clip (image-text) | simclr (image-image)
    model: str = "small-cnn"  # a name from trainers.models.MODELS
    width: float = 1.0  # multiplies the model's channel widths (CNN, ViT)
    image_size: int = 32  # images are resized to image_size x image_size, 3 channels
    epochs: int = 2  # passes over the pretraining subset
    batch_size: int = 64  # global: each of W workers takes batch_size // W
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine decay to 0 after warm-up, or constant
    warmup_epochs: float = 0.0
    amp: str = "none"  # mixed precision on CUDA: none | bf16 | fp16
    noise_pattern: str = "symmetric"  # label noise: symmetric (any other class) | pairwise (next class)
    class_balanced: bool = False  # pretrain_size subsets with (nearly) equal samples per class


_SETTING_READERS: dict[str, Callable[[str, Any], Any]] = {
    "method": _choice(METHODS),
    "model": lambda p, v: _model_name(p, v),
    "width": _positive_float,
    "image_size": lambda p, v: _int(p, v, minimum=8, maximum=4096),
    "epochs": lambda p, v: _int(p, v, minimum=1, maximum=100_000),
    "batch_size": lambda p, v: _int(p, v, minimum=1),
    "lr": _positive_float,
    "weight_decay": lambda p, v: _float(p, v, lo=0.0),
    "lr_schedule": _choice(LR_SCHEDULES),
    "warmup_epochs": lambda p, v: _float(p, v, lo=0.0),
    "amp": _choice(AMP_MODES),
    "noise_pattern": _choice(NOISE_PATTERNS),
    "class_balanced": _bool,
}
# Axes of the pretraining grid besides the settings above.
_VIEW_AXES: dict[str, Callable[[str, Any], Any]] = {
    "pretrain_size": _size_or_full,
    "label_noise": lambda p, v: _float(p, v, lo=0.0, hi=1.0),
    "seed": lambda p, v: _int(p, v, minimum=0),
    "class_fraction": lambda p, v: _class_fraction(p, v),
    "caption_noise": lambda p, v: _float(p, v, lo=0.0, hi=1.0),  # clip: share of captions swapped
}


def _class_fraction(path: str, v: Any) -> float:
    v = _float(path, v, lo=0.0, hi=1.0)
    if v == 0.0:
        raise SpecError(path, "must be in (0, 1], got 0")
    return v


def _model_name(path: str, v: Any) -> str:
    from trainers.models import MODELS

    return _choice(tuple(sorted(MODELS)))(path, v)


@dataclass(frozen=True)
class PretrainSpec:
    """``pretrain.sweep`` is one grid (axis -> values) or a list of grids whose points are united.
    ``sweep`` is every axis's values over all grids (a grid without the axis adds the base value)."""

    base: PretrainSettings
    sweep: dict[str, tuple]  # axis -> values; always has source, pretrain_size, label_noise, seed
    grids: tuple[dict[str, tuple], ...] = ()  # each has the same always-present axes as sweep
    listed: bool = False  # the YAML gave a list of grids: fields read pretrain.sweep[i]

    def __post_init__(self):
        if not self.grids:  # built by hand from one grid
            object.__setattr__(self, "grids", (self.sweep,))

    def grid_path(self, i: int) -> str:
        return f"pretrain.sweep[{i}]" if self.listed else "pretrain.sweep"


SEARCH_ALGORITHMS = ("random", "asha")


@dataclass(frozen=True)
class FinetuneSearch:
    """A Ray Tune search over the fine-tuning hyperparameters of each finetune / lp_ft fit, in
    place of the ``lr`` grid (orchestrator.search). ``num_samples`` configs are drawn
    log-uniformly from the ranges (seeded by ``seed``); each trains up to ``transfer.finetune.steps``
    steps and reports validation accuracy every ``eval_every`` steps; ``asha`` stops the worse
    configs at rungs ``grace_steps`` × ``reduction_factor``^k. The best on validation is retrained
    and scored on test."""

    algorithm: str  # random | asha
    num_samples: int = 8
    lr: tuple[float, float] = (1e-4, 1e-1)  # [lo, hi], sampled log-uniformly
    weight_decay: float | tuple[float, float] = 1e-4  # a fixed number, or [lo, hi] sampled log-uniformly
    eval_every: int = 25  # steps between validation reports (parsed default: grace_steps)
    grace_steps: int = 25  # asha: steps before a config can be stopped (parsed default: steps // 4)
    reduction_factor: int = 2  # asha: 1 in reduction_factor configs goes on at each rung
    seed: int = 0  # of the sampler
    max_concurrent_trials: int | None = None  # default: one per cluster CPU; 1 makes asha deterministic


@dataclass(frozen=True)
class FinetuneSpec:
    """Settings of the finetune and lp_ft protocols (see trainers.transfer.FinetuneSettings)."""

    lr: tuple[float, ...] = (1e-3, 1e-2)  # a grid: the learning rate with the best validation accuracy wins
    steps: int = 100  # AdamW steps on the shots (with a search: each trial's maximum)
    batch_size: int = 32
    weight_decay: float = 1e-4
    search: FinetuneSearch | None = None  # a Tune search instead of the lr grid


@dataclass(frozen=True)
class TransferSpec:
    protocol: tuple[str, ...] = ("linear_probe",)
    shots: tuple = (1, 5, 10, FULL)  # examples per class, or 'full' (the whole training pool)
    seeds: tuple[int, ...] = (0,)  # few-shot sampling seeds; 'full' is fitted once
    tasks: tuple[str, ...] = ()  # which tasks to evaluate on; empty = all
    val_fraction: float = 0.2  # share of each task's train split held out to choose the probe's L2
    layers: tuple[str, ...] = ("final",)  # backbone layers the frozen-feature probes read (layer-wise analysis)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)


LIGHT_TRIAL_GPUS = 0.25


@dataclass(frozen=True)
class Resources:
    workers: int = 1  # Ray Train workers per pretraining run
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    # GPU share of each transfer and datamodel trial (light work) when use_gpu: 0.25 packs four
    # of them on a GPU. None = LIGHT_TRIAL_GPUS.
    light_trial_gpus: float | None = None
    max_concurrent_trials: int | None = None  # default: derived from the cluster's CPUs
    max_failures: int = 2  # restarts of a pretraining run's workers (from the last checkpoint)

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
class DatamodelSpec:
    """A datamodel sweep (Jain et al.): ``num_models`` supervised models with the ``pretrain``
    settings, model i on a random ``class_fraction`` of ``source``'s classes (seeded by ``seed``
    and i), each probed on ``task``. ``models_per_trial`` models train at once in one process."""

    source: str
    task: str
    num_models: int
    class_fraction: float = 0.5
    seed: int = 0
    models_per_trial: int = 16
    protocol: str = "linear_probe"  # frozen-feature probe: linear_probe | logistic
    shots: int | str = FULL  # examples per class of the probe, or 'full'
    transfer_seed: int = 0  # few-shot draw of the probe
    counterfactual: "CounterfactualSpec | None" = None  # run the follow-up study right after the sweep


@dataclass(frozen=True)
class CounterfactualSpec:
    """``datamodels.counterfactual``: after the sweep, plan and run the follow-up study that
    removes the K most harmful / helpful / random classes (``transferlab counterfactual``)."""

    remove_top: tuple[int, ...]
    arms: tuple[str, ...] = ("harmful", "helpful", "random")
    seeds: int = 3  # pretraining seeds of each follow-up source


COUNTERFACTUAL_ARMS = ("harmful", "helpful", "random")


def _counterfactual(data: Any, num_classes_hint: int | None = None) -> CounterfactualSpec | None:
    if data is None:
        return None
    c = _Mapping("datamodels.counterfactual", data, tuple(f.name for f in fields(CounterfactualSpec)))
    ks = c.get("remove_top", lambda q, v: _list(q, v, lambda r, x: _int(r, x, minimum=1)))
    if not ks:
        raise SpecError("datamodels.counterfactual.remove_top", "must list at least one K (classes to remove)")
    return CounterfactualSpec(
        remove_top=tuple(sorted(set(ks))),
        arms=c.get("arms", lambda q, v: _list(q, v, _choice(COUNTERFACTUAL_ARMS)), COUNTERFACTUAL_ARMS),
        seeds=c.get("seeds", lambda q, v: _int(q, v, minimum=1, maximum=1000), 3),
    )


DATAMODEL_PROTOCOLS = ("linear_probe", "logistic")
MAX_DATAMODELS = 1_000_000  # model seeds are seed * MAX_DATAMODELS + index


@dataclass(frozen=True)
class Budget:
    """Limits on one ``transferlab run`` (``plan``/``validate``/``run`` refuse a study over them)."""

    max_trials: int | None = None  # Ray Tune trials the run may launch (pretraining + transfer)
    max_hours: float | None = None  # estimated wall time; at run time no trial starts after it


@dataclass(frozen=True)
class StudySpec:
    study: str  # also the MLflow experiment name
    sources: dict[str, DataRef]
    tasks: dict[str, DataRef]
    pretrain: PretrainSpec
    transfer: TransferSpec
    resources: Resources = field(default_factory=Resources)
    tracking_uri: str | None = None  # default: MLflow's default store in the working directory
    storage_path: str | None = None  # checkpoints; default ./transferlab_storage
    preflight_overlap: str = "off"  # leakage check source train vs task test: off | warn | error
    datamodels: DatamodelSpec | None = None  # a datamodel sweep instead of the pretraining grid
    budget: Budget = field(default_factory=Budget)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def transfer_tasks(self) -> tuple[str, ...]:
        return self.transfer.tasks or tuple(self.tasks)


def _datarefs(m: _Mapping, key: str) -> dict[str, DataRef]:
    path = m.at(key)
    raw = m.get(key, lambda p, v: v)
    if not isinstance(raw, dict) or not raw:
        raise SpecError(path, "must be a non-empty mapping of name -> {uri: ...}")
    out = {}
    for name, body in raw.items():
        name = _name(f"{path}.{name}", name)
        if isinstance(body, str):
            body = {"uri": body}
        allowed = (("uri", "keep_classes", "drop_classes", "caption_matches", "caption_excludes") if key == "sources" else ("uri",)) + _COLUMN_KEYS
        d = _Mapping(f"{path}.{name}", body, allowed)
        class_list = lambda q, v: _list(q, v, lambda r, x: str(x) if isinstance(x, (str, int)) and not isinstance(x, bool) else _str(r, x))
        out[name] = DataRef(
            name=name,
            uri=d.get("uri", _str),
            keep_classes=d.get("keep_classes", class_list, None),
            drop_classes=d.get("drop_classes", class_list, ()),
            caption_matches=d.get("caption_matches", _regex, None),
            caption_excludes=d.get("caption_excludes", _regex, None),
            columns={k: d.get(k, _str) for k in _COLUMN_KEYS if k in d.data},
        )
    return out


def _regex(path: str, v: Any) -> str:
    v = _str(path, v)
    try:
        re.compile(v)
    except re.error as e:
        raise SpecError(path, f"invalid regular expression {_short(v)}: {e}") from None
    return v


def _pretrain(m: _Mapping, sources: dict[str, DataRef]) -> PretrainSpec:
    allowed = tuple(f.name for f in fields(PretrainSettings)) + ("sweep",)
    p = _Mapping("pretrain", m.get("pretrain", lambda _, v: v, {}), allowed)
    defaults = PretrainSettings()
    base = PretrainSettings(**{k: p.get(k, r, getattr(defaults, k)) for k, r in _SETTING_READERS.items()})
    raw = p.get("sweep", lambda _, v: v, {})
    listed = isinstance(raw, list)
    if listed and not raw:
        raise SpecError("pretrain.sweep", "must hold at least one grid (a mapping of axis -> values)")
    if not listed and not isinstance(raw, dict):
        raise SpecError("pretrain.sweep", f"must be a mapping of axis -> values or a list of them, got {_typename(raw)}")
    grids = tuple(_grid(f"pretrain.sweep[{i}]" if listed else "pretrain.sweep", g, sources) for i, g in enumerate(raw if listed else [raw]))
    axes = dict.fromkeys(a for g in grids for a in g)
    sweep = {a: tuple(dict.fromkeys(v for g in grids for v in (g[a] if a in g else (getattr(base, a),)))) for a in axes}
    return PretrainSpec(base=base, sweep=sweep, grids=grids, listed=listed)


def _grid(path: str, data: Any, sources: dict[str, DataRef]) -> dict[str, tuple]:
    """One grid of the pretraining sweep, with the view axes it leaves out at their defaults."""
    axes = ("source",) + tuple(_VIEW_AXES) + tuple(_SETTING_READERS)
    s = _Mapping(path, data, axes)
    source_reader = _choice(tuple(sources))
    grid: dict[str, tuple] = {"source": s.get("source", lambda q, v: _list(q, v, source_reader), tuple(sources))}
    view_defaults = {"pretrain_size": (None,), "label_noise": (0.0,), "seed": (0,), "class_fraction": (1.0,), "caption_noise": (0.0,)}
    for axis, reader in {**_VIEW_AXES, **_SETTING_READERS}.items():
        if axis in s.data:
            grid[axis] = s.get(axis, lambda q, v, r=reader: _list(q, v, r))
        elif axis in view_defaults:
            grid[axis] = view_defaults[axis]
    return grid


def _transfer(m: _Mapping, tasks: dict[str, DataRef]) -> TransferSpec:
    t = _Mapping("transfer", m.get("transfer", lambda _, v: v, {}), tuple(f.name for f in fields(TransferSpec)))
    d = TransferSpec()
    spec = TransferSpec(
        protocol=t.get("protocol", lambda q, v: _list(q, v, _choice(PROTOCOLS)), d.protocol),
        shots=t.get("shots", lambda q, v: _list(q, v, _shots), d.shots),
        seeds=t.get("seeds", lambda q, v: _list(q, v, lambda r, x: _int(r, x, minimum=0)), d.seeds),
        tasks=t.get("tasks", lambda q, v: _list(q, v, _choice(tuple(tasks))), ()),
        val_fraction=t.get("val_fraction", lambda q, v: _float(q, v, lo=0.01, hi=0.9), d.val_fraction),
        layers=t.get("layers", lambda q, v: _list(q, v, _name), d.layers),
        finetune=_finetune(t.get("finetune", lambda _, v: v, {})),
    )
    if spec.finetune.search is not None and not set(spec.protocol) & {"finetune", "lp_ft"}:
        raise SpecError("transfer.finetune.search", "searches the finetune and lp_ft protocols; transfer.protocol has neither")
    return spec


def _finetune(data: Any) -> FinetuneSpec:
    f = _Mapping("transfer.finetune", data, tuple(x.name for x in fields(FinetuneSpec)))
    d = FinetuneSpec()
    spec = FinetuneSpec(
        lr=f.get("lr", lambda q, v: _list(q, v, _positive_float), d.lr),
        steps=f.get("steps", lambda q, v: _int(q, v, minimum=1), d.steps),
        batch_size=f.get("batch_size", lambda q, v: _int(q, v, minimum=1), d.batch_size),
        weight_decay=f.get("weight_decay", lambda q, v: _float(q, v, lo=0.0), d.weight_decay),
    )
    if f.data.get("search") is None:
        return spec
    for key in ("lr", "weight_decay"):  # one place per setting: the search's ranges replace these
        if key in f.data and key in (f.data["search"] if isinstance(f.data["search"], dict) else {}):
            raise SpecError(f"transfer.finetune.{key}", f"is set both here and in transfer.finetune.search.{key}; keep one")
    if "lr" in f.data:
        raise SpecError("transfer.finetune.lr", "a search samples the lr from transfer.finetune.search.lr; remove this grid")
    return dataclasses.replace(spec, search=_search(f.data["search"], spec))


def _log_range(path: str, v: Any) -> tuple[float, float]:
    if not isinstance(v, list) or len(v) != 2:
        raise SpecError(path, f"must be a range [lo, hi], got {_typename(v)} {_short(v)}")
    lo, hi = _positive_float(f"{path}[0]", v[0]), _positive_float(f"{path}[1]", v[1])
    if not lo < hi:
        raise SpecError(path, f"lo must be below hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def _search(data: Any, ft: FinetuneSpec) -> FinetuneSearch:
    path = "transfer.finetune.search"
    s = _Mapping(path, data, tuple(x.name for x in fields(FinetuneSearch)))
    algorithm = s.get("algorithm", _choice(SEARCH_ALGORITHMS))

    def steps(q: str, v: Any) -> int:
        if _int(q, v, minimum=1) > ft.steps:
            raise SpecError(q, f"must be <= transfer.finetune.steps ({ft.steps}), got {v}")
        return v

    if algorithm != "asha":
        for key in ("grace_steps", "reduction_factor"):
            if key in s.data:
                raise SpecError(s.at(key), f"applies to algorithm asha only, not {algorithm}")
    grace = s.get("grace_steps", steps, max(1, ft.steps // 4))
    weight_decay = s.data.get("weight_decay", ft.weight_decay)
    return FinetuneSearch(
        algorithm=algorithm,
        num_samples=s.get("num_samples", lambda q, v: _int(q, v, minimum=1, maximum=10_000), FinetuneSearch.num_samples),
        lr=s.get("lr", _log_range, FinetuneSearch.lr),
        weight_decay=_log_range(s.at("weight_decay"), weight_decay) if isinstance(weight_decay, list)
        else _float(s.at("weight_decay"), weight_decay, lo=0.0),
        eval_every=s.get("eval_every", steps, grace),
        grace_steps=grace,
        reduction_factor=s.get("reduction_factor", lambda q, v: _int(q, v, minimum=2, maximum=100), FinetuneSearch.reduction_factor),
        seed=s.get("seed", lambda q, v: _int(q, v, minimum=0), 0),
        max_concurrent_trials=s.get("max_concurrent_trials", lambda q, v: _int(q, v, minimum=1, maximum=10_000), None),
    )


def _resources(m: _Mapping) -> Resources:
    r = _Mapping("resources", m.get("resources", lambda _, v: v, {}), tuple(f.name for f in fields(Resources)))
    d = Resources()
    use_gpu = r.get("use_gpu", _bool, d.use_gpu)
    return Resources(
        workers=r.get("workers", lambda q, v: _int(q, v, minimum=1), d.workers),
        cpus_per_worker=r.get("cpus_per_worker", _positive_float, d.cpus_per_worker),
        use_gpu=use_gpu,
        light_trial_gpus=r.get("light_trial_gpus", _light_trial_gpus(use_gpu), None),
        max_concurrent_trials=r.get("max_concurrent_trials", lambda q, v: _int(q, v, minimum=1), None),
        max_failures=r.get("max_failures", lambda q, v: _int(q, v, minimum=0), d.max_failures),
    )


def _light_trial_gpus(use_gpu: bool) -> Callable[[str, Any], float]:
    def read(path: str, v: Any) -> float:
        share = _float(path, v)
        if not 0 < share <= 1:
            raise SpecError(path, f"must be in (0, 1] (a share of one GPU), got {share:g}")
        if not use_gpu:
            raise SpecError(path, "applies to GPU trials only: set resources.use_gpu: true, or remove it")
        return share

    return read


def _check_amp(pretrain: PretrainSpec, resources: Resources) -> None:
    """Mixed precision runs on CUDA only; without a GPU it would be ignored while the runs'
    params said otherwise."""
    if resources.use_gpu:
        return
    for g, grid in enumerate(pretrain.grids):
        swept = "amp" in grid
        for i, amp in enumerate(grid["amp"] if swept else (pretrain.base.amp,)):
            if amp != "none":
                raise SpecError(f"{pretrain.grid_path(g)}.amp[{i}]" if swept else "pretrain.amp",
                                f"{amp} mixed precision runs on CUDA only: set resources.use_gpu: true, or amp: none")


def _datamodels(m: _Mapping, sources: dict[str, DataRef], tasks: dict[str, DataRef]) -> DatamodelSpec | None:
    if m.data.get("datamodels") is None:
        return None
    d = _Mapping("datamodels", m.data["datamodels"], tuple(f.name for f in fields(DatamodelSpec)))
    pretrain = m.data.get("pretrain")
    if isinstance(pretrain, dict) and "sweep" in pretrain:
        raise SpecError("pretrain.sweep", "a datamodels study draws its own class subsets (datamodels.class_fraction); remove the sweep")
    if isinstance(pretrain, dict) and pretrain.get("method", "supervised") != "supervised":
        raise SpecError("pretrain.method", f"datamodel sweeps train supervised models only, got {_short(pretrain['method'])}")
    fraction = d.get("class_fraction", _class_fraction, 0.5)
    if fraction == 1.0:
        raise SpecError("datamodels.class_fraction", "must be below 1: models that all see every class say nothing about any class")
    return DatamodelSpec(
        source=d.get("source", _choice(tuple(sources))),
        task=d.get("task", _choice(tuple(tasks))),
        num_models=d.get("num_models", lambda q, v: _int(q, v, minimum=2, maximum=MAX_DATAMODELS)),
        class_fraction=fraction,
        seed=d.get("seed", lambda q, v: _int(q, v, minimum=0, maximum=2000), 0),
        models_per_trial=d.get("models_per_trial", lambda q, v: _int(q, v, minimum=1, maximum=4096), 16),
        protocol=d.get("protocol", _choice(DATAMODEL_PROTOCOLS), "linear_probe"),
        shots=d.get("shots", _shots, FULL),
        transfer_seed=d.get("transfer_seed", lambda q, v: _int(q, v, minimum=0), 0),
        counterfactual=_counterfactual(d.get("counterfactual", lambda _, v: v, None)),
    )


def _budget(m: _Mapping) -> Budget:
    b = _Mapping("budget", m.get("budget", lambda _, v: v, {}), tuple(f.name for f in fields(Budget)))
    return Budget(
        max_trials=b.get("max_trials", lambda q, v: _int(q, v, minimum=1), None),
        max_hours=b.get("max_hours", _positive_float, None),
    )


def parse_spec(data: Any) -> StudySpec:
    """Validate a loaded YAML document into a StudySpec (raises SpecError)."""
    top = ("study", "sources", "tasks", "pretrain", "transfer", "resources", "tracking_uri", "storage_path", "preflight_overlap",
           "datamodels", "budget")
    m = _Mapping("", data, top)
    study = m.get("study", _name)
    sources = _datarefs(m, "sources")
    tasks = _datarefs(m, "tasks")
    pretrain, resources = _pretrain(m, sources), _resources(m)
    _check_amp(pretrain, resources)
    return StudySpec(
        study=study,
        sources=sources,
        tasks=tasks,
        pretrain=pretrain,
        transfer=_transfer(m, tasks),
        resources=resources,
        tracking_uri=m.get("tracking_uri", _str, None),
        storage_path=m.get("storage_path", _str, None),
        preflight_overlap=m.get("preflight_overlap", _overlap_mode, "off"),
        datamodels=_datamodels(m, sources, tasks),
        budget=_budget(m),
        raw=data,
    )


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a duplicated source or setting would vanish without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the mapping check below reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a loaded study document."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(item, "override must look like key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(key, f"cannot parse override value {value!r}") from None
        _set_path(data, key.split("."), parsed)
    return data


def _set_path(node: dict, parts: list[str], value: Any) -> None:
    """``node[a][b]... = value``, making missing mappings; through a list of mappings (a list of
    grids, ``pretrain.sweep.seed=[0,1]``) it sets the rest of the path in every one."""
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, list) and child and all(isinstance(x, dict) for x in child):
            for x in child:
                _set_path(x, parts[i + 1:], copy.deepcopy(value))
            return
        if not isinstance(child, dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


QUICK_SUFFIX = "-quick"


def apply_quick(data: dict, quick: bool) -> dict:
    """Drop the document's ``quick:`` section; with ``quick``, apply it first: each ``key.path:
    value`` replaces that field (as a KEY=VALUE override would), and the study is renamed
    STUDY-quick so toy runs never mix with the real study's in MLflow."""
    section = data.pop("quick", None)
    if not quick:
        return data
    if section is None:
        raise SpecError("--quick", "this study file has no 'quick:' section (key.path: value fields for a toy-size run)")
    if not isinstance(section, dict) or not section:
        raise SpecError("quick", f"must be a non-empty mapping of key.path -> value, got {_typename(section)}")
    for key, value in section.items():
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith(".") or key == "quick":
            raise SpecError(f"quick.{key}", "must be a dotted field path such as pretrain.epochs")
        _set_path(data, key.split("."), copy.deepcopy(value))
    if "study" not in section and isinstance(data.get("study"), str):
        data["study"] += QUICK_SUFFIX
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> StudySpec:
    """Read and validate a study file; relative dataset paths resolve against its folder.
    ``quick`` applies the file's ``quick:`` section (see :func:`apply_quick`) before ``overrides``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(str(path), f"cannot read study file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), f"not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: tags cannot construct objects
    except RecursionError:
        raise SpecError(str(path), "invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(str(path), f"invalid YAML{where}: {problem}") from None
    if data is None:
        raise SpecError(str(path), "the study file is empty")
    if isinstance(data, dict):
        data = apply_quick(data, quick)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    spec = parse_spec(data)
    for group in (spec.sources, spec.tasks):
        for name, ref in group.items():
            if "://" not in ref.uri and not ref.uri.startswith("builtin:") and not Path(ref.uri).is_absolute():
                group[name] = dataclasses.replace(ref, uri=str((path.parent / ref.uri).resolve()))
    return spec
