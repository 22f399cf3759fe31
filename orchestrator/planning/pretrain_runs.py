"""The pretraining grid expanded into :class:`PretrainRun` s: one per point of every grid, each
with its data view, its trainer config and its content hash."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass

from datasets_ import PretrainView, ShardedDataset
from datasets_.view_stats import ViewError, view_statistics
from datasets_.views import class_subset
from orchestrator.planning.hashing import content_hash
from orchestrator.spec import DataRef, PretrainSettings, SpecError, StudySpec
from trainers.models import image_size_multiple, model_config, timm_build_problem
from trainers.pretrain import PretrainConfig
from trainers.protocols import FULL


@dataclass(frozen=True)
class PretrainRun:
    """One pretraining run of the plan: an MLflow run of kind ``pretrain`` and one TorchTrainer."""

    source: str  # its dataset is the plan's data['sources.' + source]
    settings: PretrainSettings
    view: PretrainView
    config: PretrainConfig  # what the training loop gets, as it is
    realized_label_noise: float
    config_hash: str
    run_name: str

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_train_samples(self) -> int:
        return self.config.num_train_samples

    @property
    def model_config(self) -> dict:
        return self.config.model_config

    @property
    def params(self) -> dict:
        s = asdict(self.settings)
        view = self.view
        return {
            "method": s["method"],
            "source": self.source,
            "pretrain_size": view.pretrain_size,
            "label_noise": view.label_noise,
            "model": s["model"],
            "seed": view.seed,
            # head_weight_decay only when set: unset, the head decays as the rest (weight_decay)
            **{
                k: v
                for k, v in s.items()
                if k not in ("method", "model") and not (k == "head_weight_decay" and v is None)
            },
            "model_config": self.model_config,
            "view_fingerprint": view.fingerprint,
            "class_fraction": 1.0 if view.keep_classes is None else len(view.keep_classes) / self.num_classes,
            "kept_classes": "all" if view.keep_classes is None else ",".join(map(str, view.keep_classes)),
            **({"caption_matches": view.caption_matches} if view.caption_matches else {}),
            **({"caption_noise": view.caption_noise} if s["method"] == "clip" else {}),
            **({"caption_excludes": view.caption_excludes} if view.caption_excludes else {}),
        }

    def heldout_view(self) -> PretrainView | None:
        """The held-out split under the same class and caption filters (no subset, no noise):
        upstream accuracy is measured on the classes the model trained on."""
        v = self.view
        if v.keep_classes is None and not v.needs_captions:
            return None
        return PretrainView(
            v.source_fingerprint,
            None,
            0.0,
            v.seed,
            self.num_classes,
            keep_classes=v.keep_classes,
            caption_matches=v.caption_matches,
            caption_excludes=v.caption_excludes,
        )


def pretrain_runs(spec: StudySpec, data: dict[str, ShardedDataset]) -> list[PretrainRun]:
    """Every point of every pretraining grid, once: a point that an earlier grid already holds
    (same content hash) is dropped, so overlapping grids cost nothing twice."""
    points = list(_grid_points(spec, data))
    stats = _view_stats(spec, data, points)
    # Names say what varies across the whole plan, so points of different grids keep distinct names.
    varying = {a for a, values in spec.pretrain.sweep.items() if len(values) > 1}
    runs: dict[str, PretrainRun] = {}
    for path, width_field, source, settings, view in points:
        ds = data[f"sources.{source}"]
        st = stats[source, view.fingerprint]
        if isinstance(st, ViewError):
            if st.eligible == 0:
                raise SpecError(f"sources.{source}", "its class and caption filters leave no training sample")
            raise SpecError(
                f"{path}.pretrain_size",
                f"source '{source}': {st} (after class and caption filters: {st.eligible} samples)",
            )
        if view.caption_noise > 0:
            _check_caption_noise(path, settings, source, st.captioned)
        view = dataclasses.replace(view, threshold=st.threshold)
        mcfg = checked_model_config(settings, width_field)
        h = content_hash(
            {"kind": "pretrain", "settings": settings.hashed(), "model_config": mcfg, "view": view.fingerprint}
        )
        config = PretrainConfig(
            method=settings.method,
            model_config=mcfg,
            num_classes=ds.num_classes,
            classes=tuple(ds.classes),
            image_size=settings.image_size,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            head_weight_decay=settings.head_weight_decay,
            lr_schedule=settings.lr_schedule,
            warmup_epochs=settings.warmup_epochs,
            amp=settings.amp,
            seed=view.seed,
            num_train_samples=st.selected,
            caption_noise=view.caption_noise,
            log_every_steps=settings.log_every_steps,
            meta={"config_hash": h, "source": source, "classes": list(ds.classes)},
        )
        runs.setdefault(
            h,
            PretrainRun(
                source, settings, view, config, st.realized_noise, h, run_name(settings, source, view, varying)
            ),
        )
    return list(runs.values())


def _grid_points(spec: StudySpec, data: dict[str, ShardedDataset]):
    """(grid path, field of its width, source, settings, view without its threshold) of every
    grid point, in order."""
    for g, grid in enumerate(spec.pretrain.grids):
        path, axes = spec.pretrain.grid_path(g), list(grid)
        for combo in itertools.product(*(grid[a] for a in axes)):
            point = dict(zip(axes, combo))
            settings = dataclasses.replace(
                spec.pretrain.base, **{k: v for k, v in point.items() if k in asdict(spec.pretrain.base)}
            )
            source = point["source"]
            ds = data[f"sources.{source}"]
            ref = spec.sources[source]
            view = PretrainView(
                ds.fingerprint,
                point["pretrain_size"],
                point["label_noise"],
                point["seed"],
                ds.num_classes,
                1.0,
                settings.noise_pattern,
                kept_classes(ref, ds, point["class_fraction"], point["seed"]),
                ref.caption_matches,
                ref.caption_excludes,
                settings.class_balanced,
                point["caption_noise"],
            )
            if view.caption_noise > 0 and settings.method != "clip":
                raise SpecError(
                    f"{path}.caption_noise",
                    "caption noise swaps the captions of image-text training; it needs method 'clip', "
                    f"not '{settings.method}'",
                )
            yield path, f"{path}.width" if "width" in grid else "pretrain.width", source, settings, view


def _view_stats(spec: StudySpec, data: dict[str, ShardedDataset], points) -> dict:
    """{(source, view fingerprint): ViewStats or ViewError}, each source's split read once."""
    out = {}
    for source in dict.fromkeys(p[2] for p in points):
        views = list({v.fingerprint: v for *_, s, _, v in points if s == source}.values())
        for v, st in zip(views, view_statistics(data[f"sources.{source}"], views)):
            out[source, v.fingerprint] = st
    return out


def run_name(settings: PretrainSettings, source: str, view: PretrainView, varying: set[str]) -> str:
    """``method source n=SIZE noise=NOISE`` and whatever else varies across the plan."""
    size = FULL if view.pretrain_size is None else view.pretrain_size
    name = f"{settings.method} {source} n={size} noise={view.label_noise:g}"
    if settings.noise_pattern != "symmetric":
        name += f" ({settings.noise_pattern})"
    if "class_fraction" in varying or view.keep_classes is not None:
        name += f" classes={len(view.keep_classes) if view.keep_classes else 'all'}"
    values = asdict(settings)
    extras = [f"{k}={values[k]}" for k in sorted(varying) if k in values and k not in ("method", "noise_pattern")]
    if "caption_noise" in varying or view.caption_noise:
        extras.append(f"captions={view.caption_noise:g}")
    if "seed" in varying:
        extras.append(f"seed={view.seed}")
    return " ".join([name, *extras])


def checked_model_config(settings: PretrainSettings, field: str) -> dict:
    """The model config of a grid point; size/shape problems are spec errors naming ``field`` (the width's)."""
    try:
        cfg = model_config(settings.model, width=settings.width)
    except ValueError as e:
        raise SpecError(field, str(e)) from None
    patch = image_size_multiple(cfg)
    if settings.image_size % patch:
        raise SpecError(
            "pretrain.image_size",
            f"{settings.image_size} is not a multiple of model '{settings.model}'s patch size {patch}",
        )
    if cfg["arch"] == "timm":
        problem = timm_build_problem(cfg["name"], settings.image_size)
        if problem:
            raise SpecError("pretrain.model", f"'{settings.model}' at image_size {settings.image_size}: {problem}")
    return cfg


def kept_classes(ref: DataRef, ds: ShardedDataset, fraction: float, seed: int) -> tuple[int, ...] | None:
    """Class ids a view trains on: the source's keep/drop lists, then a random fraction of those."""
    field = f"sources.{ref.name}"
    for attr in ("keep_classes", "drop_classes"):
        unknown = [c for c in getattr(ref, attr) or () if c not in ds.classes]
        if unknown:
            raise SpecError(f"{field}.{attr}", f"unknown class {unknown[0]!r} (classes: {', '.join(ds.classes[:20])})")
    ids = [
        i
        for i, c in enumerate(ds.classes)
        if (ref.keep_classes is None or c in ref.keep_classes) and c not in ref.drop_classes
    ]
    if not ids:
        raise SpecError(field, "keep_classes/drop_classes leave no class")
    if fraction < 1.0:
        ids = [ids[i] for i in class_subset(len(ids), fraction, seed)]
    return None if len(ids) == ds.num_classes else tuple(ids)


def _check_caption_noise(grid_path: str, settings: PretrainSettings, source: str, captioned: int) -> None:
    if not captioned:
        raise SpecError(f"sources.{source}.uri", f"source '{source}' has no captions for caption_noise to swap")
