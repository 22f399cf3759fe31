"""The transfer fits of a plan: for every (pretraining run, task) one :class:`TransferGroup`
holding each protocol × layer × shots × seed fit, which run together in one trial so that
features are extracted once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from datasets_ import ShardedDataset
from orchestrator.planning.hashing import content_hash
from orchestrator.planning.pretrain_runs import PretrainRun
from orchestrator.spec import FinetuneSearch, FinetuneSpec, SpecError, StudySpec
from trainers.models import layer_names
from trainers.protocols import FINAL_LAYER, FINETUNE_PROTOCOLS, FROZEN_PROTOCOLS, FULL
from trainers.transfer import FinetuneSettings, TransferConfig


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
    task: str  # its dataset is the plan's data['tasks.' + task]
    config: TransferConfig  # what the transfer trainer gets, as it is
    search: FinetuneSearch | None  # a Tune search of the finetune / lp_ft fits (transfer.finetune.search)
    fits: tuple[TransferFit, ...]
    # The pretraining run's settings that vary across studies, logged on every fit too, so the
    # MLflow runs table compares accuracy against them without walking to the parent run.
    pretrain: dict = field(default_factory=dict)

    def searched(self, fit: TransferFit) -> bool:
        """Whether the fit's hyperparameters come from a Tune search (execution.search)."""
        return fit.protocol in FINETUNE_PROTOCOLS and self.search is not None

    def params(self, fit: TransferFit) -> dict:
        p = {
            "task": self.task,
            "protocol": fit.protocol,
            "shots": fit.shots,
            "seed": fit.seed,
            "layer": fit.layer,
            "val_fraction": self.config.val_fraction,
            **self.pretrain,
        }
        if fit.protocol in FINETUNE_PROTOCOLS:
            record = finetune_config(self.config.finetune, self.search)
            p.update({f"finetune_{k}": v for k, v in record.items() if k != "search"})
            if self.searched(fit):
                p.update(search_params(self.search))
        return p


def pretrain_params(run: PretrainRun) -> dict:
    """The settings of ``run`` a transfer fit carries as params (``pretrain_seed``: the
    pretraining seed, beside the fit's own few-shot ``seed``)."""
    p = run.params
    out = {k: p[k] for k in ("source", "method", "pretrain_size", "label_noise", "model", "width", "epochs",
                             "class_fraction", "caption_noise") if k in p}  # fmt: skip
    return {**out, "pretrain_seed": p["seed"]}


def finetune_settings(spec: FinetuneSpec) -> FinetuneSettings:
    """The fine-tuning trainer's config: the spec's fields of the same names."""
    return FinetuneSettings(**{f.name: getattr(spec, f.name) for f in fields(FinetuneSettings)})


def finetune_config(settings: FinetuneSettings, search: FinetuneSearch | None) -> dict:
    """What decides a fine-tuning fit's result, as hashed and logged (``finetune_*`` params):
    the settings; with a search, its ranges replace the lr grid and the weight decay."""
    d = asdict(settings)
    if search is None:
        return d
    return {"steps": d["steps"], "batch_size": d["batch_size"], "search": asdict(search)}


def search_params(search: FinetuneSearch) -> dict:
    """A fine-tuning search's settings as ``search_*`` params (asha's only where they apply)."""
    skip = () if search.algorithm == "asha" else ("grace_steps", "reduction_factor")
    out = {f"search_{k}": v for k, v in asdict(search).items() if k not in skip}
    out["search_max_concurrent_trials"] = search.max_concurrent_trials or "cluster_cpus"
    return out


def transfer_groups(spec: StudySpec, runs: list[PretrainRun], data: dict[str, ShardedDataset]) -> list[TransferGroup]:
    """Every fit of every (pretraining run, task) the spec asks for."""
    t = spec.transfer
    check_transfer(spec, runs)
    settings, search = finetune_settings(t.finetune), t.finetune.search
    record = finetune_config(settings, search)
    groups = []
    for run in runs:
        for task in spec.transfer_tasks:
            ds = data[f"tasks.{task}"]
            fits = []
            for protocol in t.protocol:
                if protocol == "zero_shot":
                    if run.settings.method == "clip":  # other methods have no text tower
                        fits.append(_fit(run, ds, task, protocol, 0, 0, FINAL_LAYER, t.val_fraction, record))
                    continue
                tuned = protocol in FINETUNE_PROTOCOLS
                if tuned and not finetunes(run, task, t.finetune):
                    continue
                draws = (t.finetune.seeds or t.seeds) if tuned else t.seeds
                for layer in t.layers if protocol in FROZEN_PROTOCOLS else (FINAL_LAYER,):
                    for shots in t.shots:
                        for seed in t.seeds[:1] if shots == FULL else draws:
                            fits.append(_fit(run, ds, task, protocol, shots, seed, layer, t.val_fraction, record))
            if fits:
                config = TransferConfig(run.settings.image_size, t.val_fraction, settings)
                groups.append(TransferGroup(run.config_hash, task, config, search, tuple(fits), pretrain_params(run)))
    return groups


def finetunes(run: PretrainRun, task: str, spec: FinetuneSpec) -> bool:
    """Whether ``run`` is fine-tuned on ``task``: ``transfer.finetune.tasks`` and ``only``."""
    if spec.tasks and task not in spec.tasks:
        return False
    settings = {**asdict(run.settings), **run.params}
    return all(settings.get(axis) in values for axis, values in spec.only.items())


def _fit(
    run: PretrainRun,
    ds: ShardedDataset,
    task: str,
    protocol: str,
    shots,
    seed: int,
    layer: str,
    val_fraction: float,
    finetune: dict,
) -> TransferFit:
    config = {
        "kind": "transfer",
        "pretrain": run.config_hash,
        "task": ds.fingerprint,
        "protocol": protocol,
        "shots": shots,
        "seed": seed,
        "layer": layer,
        "val_fraction": val_fraction,
    }
    if protocol in FINETUNE_PROTOCOLS:
        config["finetune"] = finetune
    label = "zero-shot" if protocol == "zero_shot" else FULL if shots == FULL else f"{shots}-shot"
    name = f"{protocol} {task} {label}" + ("" if protocol == "zero_shot" else f" seed={seed}")
    if layer != FINAL_LAYER:
        name += f" layer={layer}"
    return TransferFit(protocol, shots, seed, layer, content_hash(config), name)


def check_transfer(spec: StudySpec, runs: list[PretrainRun]) -> None:
    t = spec.transfer
    if "zero_shot" in t.protocol and not any(r.settings.method == "clip" for r in runs):
        raise SpecError(
            f"transfer.protocol[{t.protocol.index('zero_shot')}]",
            "zero_shot needs CLIP checkpoints; no pretraining run uses method 'clip'",
        )
    if any(p in FROZEN_PROTOCOLS for p in t.protocol):
        for run in runs:
            known = layer_names(run.model_config)
            for i, layer in enumerate(t.layers):
                if layer not in known:
                    raise SpecError(
                        f"transfer.layers[{i}]",
                        f"model '{run.settings.model}' has no layer '{layer}' (layers: {', '.join(known)})",
                    )
