"""From a validated spec to jobs: data pre-flight, grid expansion and content hashes.

A :class:`PretrainJob` is one pretraining run; a :class:`TransferGroup` is all the transfer fits
(every protocol × layer × shots × seed) of one (pretrain checkpoint, task), which run together
in one trial so that features are extracted once. Every
job and fit carries a ``config_hash`` over everything that determines its result (settings, data
fingerprints, view, code version): the hash is how a finished result is recognized in MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from datasets_ import DatasetError, PretrainView, ShardedDataset, resolve_dataset, subset_threshold, validation_mask
from datasets_.views import class_subset
from orchestrator.spec import FULL, FinetuneSpec, PretrainSettings, SpecError, StudySpec
from trainers.models import FINAL_LAYER, layer_names, model_config

FROZEN_PROTOCOLS = ("linear_probe", "logistic")  # read frozen features of every transfer.layers
FINETUNE_PROTOCOLS = ("finetune", "lp_ft")


# The code version inside every content hash. It is not the package version (which moves with
# every release, deployment tags included): bump it only when a change alters what a pretraining
# run or a transfer fit computes (loops, models, views, probes), so that every study recomputes
# instead of reusing results of the old code. It started equal to the package version 0.2.0,
# which the hash held before, so results recorded then stay valid.
RESULTS_VERSION = "0.2.0"


def content_hash(obj) -> str:
    payload = json.dumps({"code": RESULTS_VERSION, "config": obj}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class PretrainJob:
    source: str
    source_root: str
    settings: dict  # PretrainSettings as a dict
    model_config: dict
    view: PretrainView
    num_classes: int
    num_train_samples: int
    realized_label_noise: float
    config_hash: str
    run_name: str

    @property
    def params(self) -> dict:
        s = self.settings
        return {
            "method": s["method"],
            "source": self.source,
            "pretrain_size": self.view.pretrain_size,
            "label_noise": self.view.label_noise,
            "model": s["model"],
            "seed": self.view.seed,
            **{k: v for k, v in s.items() if k not in ("method", "model")},
            "model_config": self.model_config,
            "view_fingerprint": self.view.fingerprint,
            "class_fraction": 1.0 if self.view.keep_classes is None else len(self.view.keep_classes) / self.num_classes,
            "kept_classes": "all" if self.view.keep_classes is None else ",".join(map(str, self.view.keep_classes)),
            **({"caption_matches": self.view.caption_matches} if self.view.caption_matches else {}),
            **({"caption_noise": self.view.caption_noise} if s["method"] == "clip" else {}),
            **({"caption_excludes": self.view.caption_excludes} if self.view.caption_excludes else {}),
        }


@dataclass(frozen=True)
class TransferFit:
    protocol: str
    shots: int | str  # examples per class, 'full', or 0 for zero_shot
    seed: int
    layer: str
    config_hash: str
    run_name: str


@dataclass(frozen=True)
class TransferGroup:
    pretrain_hash: str
    task: str
    task_root: str
    image_size: int
    val_fraction: float
    finetune: dict  # orchestrator.spec.FinetuneSpec as a dict (finetune_config)
    fits: tuple[TransferFit, ...]

    def searched(self, fit: TransferFit) -> bool:
        """Whether the fit's hyperparameters come from a Tune search (orchestrator.search)."""
        return fit.protocol in FINETUNE_PROTOCOLS and self.finetune.get("search") is not None

    def params(self, fit: TransferFit) -> dict:
        p = {"task": self.task, "protocol": fit.protocol, "shots": fit.shots, "seed": fit.seed, "layer": fit.layer,
             "val_fraction": self.val_fraction}
        if fit.protocol in FINETUNE_PROTOCOLS:
            p.update({f"finetune_{k}": v for k, v in self.finetune.items() if k != "search"})
            if self.searched(fit):
                p.update(search_params(self.finetune["search"]))
        return p


def search_params(search: dict) -> dict:
    """A fine-tuning search's settings as ``search_*`` params (asha's only where they apply)."""
    skip = () if search["algorithm"] == "asha" else ("grace_steps", "reduction_factor")
    out = {f"search_{k}": v for k, v in search.items() if k not in skip}
    out["search_max_concurrent_trials"] = search["max_concurrent_trials"] or "cluster_cpus"
    return out


@dataclass
class StudyPlan:
    spec: StudySpec
    data: dict[str, ShardedDataset]
    pretrain_jobs: list[PretrainJob]
    transfer_groups: list[TransferGroup] = field(default_factory=list)
    datamodels: object | None = None  # orchestrator.datamodels.DatamodelPlan of a datamodels study

    @property
    def num_transfer_fits(self) -> int:
        return sum(len(g.fits) for g in self.transfer_groups)

    @property
    def spec_hash(self) -> str:
        return content_hash(self.spec.raw)


def resolve_data(spec: StudySpec) -> dict[str, ShardedDataset]:
    """Open (or, for builtins, prepare) every dataset the spec names; errors name the field."""
    out: dict[str, ShardedDataset] = {}
    for section, refs in (("sources", spec.sources), ("tasks", spec.tasks)):
        for name, ref in refs.items():
            try:
                out[f"{section}.{name}"] = resolve_dataset(ref.uri, **ref.columns)
            except DatasetError as e:
                raise SpecError(f"{section}.{name}.uri", str(e)) from None
    return out


def _check_data(spec: StudySpec, data: dict[str, ShardedDataset]) -> None:
    for section, names in (("sources", spec.pretrain.sweep["source"]), ("tasks", spec.transfer_tasks)):
        for name in names:
            ds = data[f"{section}.{name}"]
            unlabeled = ds.manifest["splits"].get("train", {}).get("unlabeled", 0)
            if ds.num_classes < 2 or unlabeled:
                raise SpecError(f"{section}.{name}.uri", f"'{name}' needs integer labels of at least 2 classes "
                                f"({ds.num_classes} classes, {unlabeled} unlabeled training samples)")
    for source in spec.pretrain.sweep["source"]:
        ds = data[f"sources.{source}"]
        n = ds.num_samples("train")
        for g, grid in enumerate(spec.pretrain.grids):
            for i, size in enumerate(grid["pretrain_size"] if source in grid["source"] else ()):
                if size is not None and size > n:
                    raise SpecError(f"{spec.pretrain.grid_path(g)}.pretrain_size[{i}]", f"{size} exceeds the {n} training samples of source '{source}'")
        if ds.num_samples("test") == 0:
            raise SpecError(f"sources.{source}.uri", f"source '{source}' has no held-out test split for upstream accuracy")
    for task in spec.transfer_tasks:
        ds = data[f"tasks.{task}"]
        train = ds.keys_and_labels("train")
        pool = train.labels[~validation_mask(train.keys, spec.transfer.val_fraction)]
        counts = [int((pool == c).sum()) for c in range(ds.num_classes)]
        smallest = min(counts)
        for i, k in enumerate(spec.transfer.shots):
            if k != FULL and k > smallest:
                cls = ds.classes[counts.index(smallest)]
                raise SpecError(
                    f"transfer.shots[{i}]",
                    f"{k} shots exceed the {smallest} training examples of class '{cls}' in task '{task}'",
                )
        if ds.num_samples("test") == 0:
            raise SpecError(f"tasks.{task}.uri", f"task '{task}' has no test split")


def _check_overlap(spec: StudySpec, data: dict[str, ShardedDataset]) -> None:
    """Leakage pre-flight: duplicates between each source's train split and each task's test split."""
    import sys

    from datasets_.overlap import find_overlap

    for source in spec.pretrain.sweep["source"]:
        for task in spec.transfer_tasks:
            r = find_overlap(data[f"sources.{source}"], data[f"tasks.{task}"], a_splits=("train",), b_splits=("test",))
            if not r["pairs"]:
                continue
            p = r["pairs"][0]
            msg = (f"source '{source}' (train) and task '{task}' (test) share {r['exact']} exact and {r['near']} "
                   f"near-duplicate image(s), e.g. {p['a_key']} ~ {p['b_key']}; see `transferlab data overlap`")
            if spec.preflight_overlap == "error":
                raise SpecError("preflight_overlap", msg)
            print(f"warning: {msg}", file=sys.stderr)


def _run_name(settings: dict, source: str, view: PretrainView, varying: set[str]) -> str:
    size = "full" if view.pretrain_size is None else view.pretrain_size
    name = f"{settings['method']} {source} n={size} noise={view.label_noise:g}"
    if settings["noise_pattern"] != "symmetric":
        name += f" ({settings['noise_pattern']})"
    if "class_fraction" in varying or view.keep_classes is not None:
        name += f" classes={len(view.keep_classes) if view.keep_classes else 'all'}"
    extras = [f"{k}={settings[k]}" for k in sorted(varying) if k in settings and k not in ("method", "noise_pattern")]
    if "caption_noise" in varying or view.caption_noise:
        extras.append(f"captions={view.caption_noise:g}")
    if "seed" in varying:
        extras.append(f"seed={view.seed}")
    return " ".join([name, *extras])


def build_plan(spec: StudySpec, data: dict[str, ShardedDataset] | None = None) -> StudyPlan:
    """Pre-flight the data and expand the pretraining grid and the transfer fits."""
    data = data if data is not None else resolve_data(spec)
    # A datamodels study probes at datamodels.shots (checked with its plan), not transfer.shots.
    _check_data(spec if spec.datamodels is None else dataclasses.replace(spec, transfer=dataclasses.replace(spec.transfer, shots=(FULL,))), data)
    if spec.preflight_overlap != "off":
        _check_overlap(spec, data)
    if spec.datamodels is not None:  # a datamodel sweep replaces the pretraining grid
        from orchestrator.datamodels import build_datamodel_plan

        return StudyPlan(spec=spec, data=data, pretrain_jobs=[], datamodels=build_datamodel_plan(spec, data))
    jobs = _pretrain_jobs(spec, data)
    plan = StudyPlan(spec=spec, data=data, pretrain_jobs=jobs)
    t = spec.transfer
    _check_transfer(spec, jobs)
    finetune = finetune_config(t.finetune)
    for job in jobs:
        for task in spec.transfer_tasks:
            ds = data[f"tasks.{task}"]
            fits = []
            for protocol in t.protocol:
                if protocol == "zero_shot":
                    if job.settings["method"] == "clip":  # other methods have no text tower
                        fits.append(_fit(job, ds, task, protocol, 0, 0, FINAL_LAYER, t, finetune))
                    continue
                for layer in t.layers if protocol in FROZEN_PROTOCOLS else (FINAL_LAYER,):
                    for shots in t.shots:
                        for seed in t.seeds[:1] if shots == FULL else t.seeds:
                            fits.append(_fit(job, ds, task, protocol, shots, seed, layer, t, finetune))
            if fits:
                plan.transfer_groups.append(
                    TransferGroup(job.config_hash, task, str(ds.root), job.settings["image_size"], t.val_fraction, finetune, tuple(fits))
                )
    return plan


def _pretrain_jobs(spec: StudySpec, data: dict[str, ShardedDataset]) -> list[PretrainJob]:
    """Every point of every pretraining grid, once: a point that an earlier grid already holds
    (same content hash) is dropped, so overlapping grids cost nothing twice."""
    # Names say what varies across the whole plan, so points of different grids keep distinct names.
    varying = {a for a, values in spec.pretrain.sweep.items() if len(values) > 1}
    jobs: dict[str, PretrainJob] = {}
    thresholds: dict[str, tuple] = {}
    columns: dict[str, tuple] = {}
    for g, grid in enumerate(spec.pretrain.grids):
        path, axes = spec.pretrain.grid_path(g), list(grid)
        for combo in itertools.product(*(grid[a] for a in axes)):
            point = dict(zip(axes, combo))
            settings = asdict(PretrainSettings(**{k: point.get(k, v) for k, v in asdict(spec.pretrain.base).items()}))
            source = point["source"]
            ds = data[f"sources.{source}"]
            ref = spec.sources[source]
            keep = _kept_classes(ref, ds, point["class_fraction"], point["seed"])
            view = PretrainView(ds.fingerprint, point["pretrain_size"], point["label_noise"], point["seed"], ds.num_classes,
                                1.0, settings["noise_pattern"], keep, ref.caption_matches, ref.caption_excludes, settings["class_balanced"],
                                point["caption_noise"])
            need_captions = view.needs_captions or view.caption_noise > 0
            if (source, need_captions) not in columns:  # one read of the key/label (and caption) columns per source
                columns[source, need_captions] = _train_columns(ds, need_captions=need_captions)
            if view.caption_noise > 0:
                _check_caption_noise(path, settings, source, columns[source, need_captions][1])
            if view.fingerprint not in thresholds:
                thresholds[view.fingerprint] = _view_stats(path, ds, source, view, *columns[source, need_captions])
            threshold, realized, selected = thresholds[view.fingerprint]
            view = dataclasses.replace(view, threshold=threshold)
            mcfg = _model_config(spec, settings, f"{path}.width" if "width" in grid else "pretrain.width")
            h = content_hash({"kind": "pretrain", "settings": settings, "model_config": mcfg, "view": view.fingerprint})
            jobs.setdefault(h, PretrainJob(
                source=source,
                source_root=str(ds.root),
                settings=settings,
                model_config=mcfg,
                view=view,
                num_classes=ds.num_classes,
                num_train_samples=selected,
                realized_label_noise=realized,
                config_hash=h,
                run_name=_run_name(settings, source, view, varying),
            ))
    return list(jobs.values())


def finetune_config(ft: FinetuneSpec) -> dict:
    """What decides a fine-tuning fit's result, as hashed and logged (``finetune_*`` params).
    Without a search it is the dict it always was, so existing studies keep their cache; with
    one, the search's ranges replace the lr grid and the weight decay."""
    d = asdict(ft)
    search = d.pop("search")
    if search is None:
        return d
    return {"steps": d["steps"], "batch_size": d["batch_size"], "search": search}


def _fit(job: PretrainJob, ds: ShardedDataset, task: str, protocol: str, shots, seed: int, layer: str, t, finetune: dict) -> TransferFit:
    config = {"kind": "transfer", "pretrain": job.config_hash, "task": ds.fingerprint, "protocol": protocol,
              "shots": shots, "seed": seed, "layer": layer, "val_fraction": t.val_fraction}
    if protocol in FINETUNE_PROTOCOLS:
        config["finetune"] = finetune
    label = "zero-shot" if protocol == "zero_shot" else "full" if shots == FULL else f"{shots}-shot"
    name = f"{protocol} {task} {label}" + ("" if protocol == "zero_shot" else f" seed={seed}")
    if layer != FINAL_LAYER:
        name += f" layer={layer}"
    return TransferFit(protocol, shots, seed, layer, content_hash(config), name)


def _model_config(spec: StudySpec, settings: dict, field: str | None = None) -> dict:
    """The model config of a grid point; size/shape problems are spec errors naming ``field`` (the width's)."""
    field = field or ("pretrain.sweep.width" if "width" in spec.pretrain.sweep else "pretrain.width")
    try:
        cfg = model_config(settings["model"], width=settings["width"])
    except ValueError as e:
        raise SpecError(field, str(e)) from None
    if cfg["arch"] == "vit" and settings["image_size"] % cfg["patch_size"]:
        raise SpecError("pretrain.image_size", f"{settings['image_size']} is not a multiple of model '{settings['model']}'s patch size {cfg['patch_size']}")
    return cfg


def _check_transfer(spec: StudySpec, jobs: list[PretrainJob]) -> None:
    t = spec.transfer
    if "zero_shot" in t.protocol and not any(j.settings["method"] == "clip" for j in jobs):
        raise SpecError(f"transfer.protocol[{t.protocol.index('zero_shot')}]", "zero_shot needs CLIP checkpoints; no pretraining run uses method 'clip'")
    if any(p in FROZEN_PROTOCOLS for p in t.protocol):
        for job in jobs:
            known = layer_names(job.model_config)
            for i, layer in enumerate(t.layers):
                if layer not in known:
                    raise SpecError(f"transfer.layers[{i}]", f"model '{job.settings['model']}' has no layer '{layer}' (layers: {', '.join(known)})")

def _kept_classes(ref, ds: ShardedDataset, fraction: float, seed: int) -> tuple[int, ...] | None:
    """Class ids a view trains on: the source's keep/drop lists, then a random fraction of those."""
    field = f"sources.{ref.name}"
    for attr in ("keep_classes", "drop_classes"):
        unknown = [c for c in getattr(ref, attr) or () if c not in ds.classes]
        if unknown:
            raise SpecError(f"{field}.{attr}", f"unknown class {unknown[0]!r} (classes: {', '.join(ds.classes[:20])})")
    ids = [i for i, c in enumerate(ds.classes) if (ref.keep_classes is None or c in ref.keep_classes) and c not in ref.drop_classes]
    if not ids:
        raise SpecError(field, "keep_classes/drop_classes leave no class")
    if fraction < 1.0:
        ids = [ids[i] for i in class_subset(len(ids), fraction, seed)]
    return None if len(ids) == ds.num_classes else tuple(ids)


def _check_caption_noise(grid_path: str, settings: dict, source: str, captions: list) -> None:
    if settings["method"] != "clip":
        raise SpecError(f"{grid_path}.caption_noise", f"caption noise swaps the captions of image-text training; "
                        f"it needs method 'clip', not '{settings['method']}'")
    if not any(isinstance(c, str) and c.strip() for c in captions):
        raise SpecError(f"sources.{source}.uri", f"source '{source}' has no captions for caption_noise to swap")


def _train_columns(ds: ShardedDataset, need_captions: bool) -> tuple:
    split = ds.keys_and_labels("train")
    captions = ds.read_split("train", ("caption",)).column("caption").to_pylist() if need_captions else None
    return split, captions


def _view_stats(grid_path: str, ds: ShardedDataset, source: str, view: PretrainView, split, captions) -> tuple[object, float, int]:
    """(subset threshold(s), realized label-noise rate, number of samples) of one view."""
    from datasets_ import in_subset, noisy_labels
    from datasets_.views import balanced_thresholds

    allowed = view.eligible(split.labels, captions)
    if not allowed.any():
        raise SpecError(f"sources.{source}", "its class and caption filters leave no training sample")
    size = view.pretrain_size
    try:
        if view.class_balanced and size is not None:
            classes = np.unique(split.labels[allowed])  # the classes left after every filter
            threshold = balanced_thresholds(split.keys[allowed], split.labels[allowed], size, view.seed, classes, ds.num_classes)
        else:
            threshold = subset_threshold(split.keys[allowed], size, view.seed)
    except ValueError as e:
        raise SpecError(f"{grid_path}.pretrain_size", f"source '{source}': {e} (after class and caption filters: {int(allowed.sum())} samples)") from None
    keep = in_subset(split.keys, threshold, view.seed, split.labels) & allowed
    noisy = noisy_labels(split.keys[keep], split.labels[keep], ds.num_classes, view.label_noise, view.seed, view.noise_pattern)
    realized = float((noisy != split.labels[keep]).mean()) if keep.any() else 0.0
    return threshold, realized, int(keep.sum())
