"""A loaded YAML document to a :class:`StudySpec`: the section readers.

Fields are read by the readers declared in :mod:`orchestrator.spec.schema`, at their declared
defaults; the code here is what crosses fields: names that must refer to the study's sources or
tasks, the pretraining grids, a search's step counts bounded by ``transfer.finetune.steps``, GPU
settings that need ``resources.use_gpu``. Fields are read in declaration order, sections in the
order of :func:`parse_spec`, so a spec with several problems always reports the same first one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator.spec.claims import StudyNames, read_claims
from orchestrator.spec.fields import (
    Mapping,
    Reader,
    SpecError,
    as_is,
    choice,
    integer,
    list_of,
    name,
    reader_of,
    short,
    spec_keys,
    string,
    typename,
)
from orchestrator.spec.schema import (
    COLUMN_KEYS,
    DatamodelSpec,
    DataRef,
    FinetuneSearch,
    FinetuneSpec,
    PretrainSettings,
    PretrainSpec,
    Resources,
    StudySpec,
    TransferSpec,
    ViewAxes,
)
from trainers.protocols import FINETUNE_PROTOCOLS


def parse_spec(data: Any) -> StudySpec:
    """Validate a loaded YAML document into a StudySpec (raises SpecError)."""
    m = Mapping("", data, spec_keys(StudySpec))
    study = m.read(StudySpec, "study")
    sources = _datarefs(m, "sources")
    tasks = _datarefs(m, "tasks")
    pretrain = _pretrain("pretrain", m.get("pretrain", as_is, {}), sources)
    resources = _resources("resources", m.get("resources", as_is, {}))
    _check_amp(pretrain, resources)
    transfer = _transfer("transfer", m.get("transfer", as_is, {}), tasks, pretrain)

    def datamodels(path: str, v: Any) -> DatamodelSpec:
        return _datamodels(path, v, data.get("pretrain"), sources, tasks)

    def claims(path: str, v: Any):
        names = StudyNames(
            task=tuple(transfer.tasks or tasks),
            source=tuple(sources),
            layer=transfer.layers,
            shots=transfer.shots,
            label_noise=pretrain.sweep.get("label_noise", ()),
            head_weight_decay=tuple(v for v in pretrain.sweep.get("head_weight_decay", ()) if v is not None),
        )
        return read_claims(path, v, names)

    return m.build(
        StudySpec,
        readers={"datamodels": datamodels, "claims": claims},
        study=study,
        sources=sources,
        tasks=tasks,
        pretrain=pretrain,
        transfer=transfer,
        resources=resources,
        raw=data,
    )


def _datarefs(m: Mapping, key: str) -> dict[str, DataRef]:
    path = m.at(key)
    raw = m.get(key, as_is)
    if not isinstance(raw, dict) or not raw:
        raise SpecError(path, "must be a non-empty mapping of name -> {uri: ...}")
    # tasks are not curated
    allowed = (spec_keys(DataRef) if key == "sources" else ("uri", "allow_compressed")) + COLUMN_KEYS
    out = {}
    for ref_name, body in raw.items():
        ref_name = name(f"{path}.{ref_name}", ref_name)
        if isinstance(body, str):
            body = {"uri": body}
        d = Mapping(f"{path}.{ref_name}", body, allowed)
        ref = d.build(DataRef, name=ref_name)
        columns = {k: d.get(k, string) for k in COLUMN_KEYS if k in d.data}
        if ref.allow_compressed:
            columns["allow_compressed"] = True
        out[ref_name] = dataclasses.replace(ref, columns=columns)
    return out


def _pretrain(path: str, data: Any, sources: dict[str, DataRef]) -> PretrainSpec:
    p = Mapping(path, data, spec_keys(PretrainSettings) + ("sweep", "pack"))
    base = p.build(PretrainSettings)
    raw = p.get("sweep", as_is, {})
    listed = isinstance(raw, list)
    if listed and not raw:
        raise SpecError("pretrain.sweep", "must hold at least one grid (a mapping of axis -> values)")
    if not listed and not isinstance(raw, dict):
        raise SpecError("pretrain.sweep", f"must be a mapping of axis -> values or a list of them, got {typename(raw)}")
    grids = tuple(
        _grid(f"pretrain.sweep[{i}]" if listed else "pretrain.sweep", g, sources)
        for i, g in enumerate(raw if listed else [raw])
    )
    axes = dict.fromkeys(a for g in grids for a in g)
    sweep = {a: tuple(dict.fromkeys(v for g in grids for v in (g[a] if a in g else (getattr(base, a),)))) for a in axes}
    pack = p.read(PretrainSpec, "pack")
    return PretrainSpec(base=base, sweep=sweep, grids=grids, listed=listed, pack=pack)


def _grid(path: str, data: Any, sources: dict[str, DataRef]) -> dict[str, tuple]:
    """One grid of the pretraining sweep, with the view axes it leaves out at their defaults."""
    axes = [(f, True) for f in dataclasses.fields(ViewAxes)]
    axes += [(f, False) for f in dataclasses.fields(PretrainSettings)]
    s = Mapping(path, data, ("source",) + tuple(f.name for f, _ in axes))
    grid: dict[str, tuple] = {"source": s.get("source", list_of(choice(tuple(sources))), tuple(sources))}
    for f, view in axes:
        if f.name in s.data:
            grid[f.name] = s.get(f.name, list_of(f.metadata["read"]))  # no default: an axis given as null is refused
        elif view:
            grid[f.name] = (f.default,)
    return grid


def _check_amp(pretrain: PretrainSpec, resources: Resources) -> None:
    """Mixed precision runs on CUDA only; without a GPU it would be ignored while the runs'
    params said otherwise."""
    if resources.use_gpu:
        return
    for g, grid in enumerate(pretrain.grids):
        swept = "amp" in grid
        for i, amp in enumerate(grid["amp"] if swept else (pretrain.base.amp,)):
            if amp != "none":
                raise SpecError(
                    f"{pretrain.grid_path(g)}.amp[{i}]" if swept else "pretrain.amp",
                    f"{amp} mixed precision runs on CUDA only: set resources.use_gpu: true, or amp: none",
                )


def _transfer(path: str, data: Any, tasks: dict[str, DataRef], pretrain: PretrainSpec) -> TransferSpec:
    t = Mapping(path, data, spec_keys(TransferSpec))
    spec = t.build(TransferSpec, readers={"tasks": list_of(choice(tuple(tasks))), "finetune": _finetune})
    if spec.finetune.search is not None and not set(spec.protocol) & set(FINETUNE_PROTOCOLS):
        raise SpecError(
            "transfer.finetune.search", "searches the finetune and lp_ft protocols; transfer.protocol has neither"
        )
    return dataclasses.replace(spec, finetune=_finetune_subset(t, spec, tuple(tasks), pretrain))


def _finetune_subset(t: Mapping, spec: TransferSpec, tasks: tuple[str, ...], pretrain: PretrainSpec) -> FinetuneSpec:
    """``transfer.finetune.only / tasks / seeds``: each must name what the study has, so that a
    typo cannot silently fine-tune nothing."""
    raw = t.data.get("finetune")
    f = Mapping(t.at("finetune"), raw if isinstance(raw, dict) else {}, spec_keys(FinetuneSpec))
    axes = {x.name: x.metadata["read"] for cls in (ViewAxes, PretrainSettings) for x in dataclasses.fields(cls)}
    axes["source"] = string

    def only(path: str, v: Any) -> dict:
        if not isinstance(v, dict):
            raise SpecError(path, f"must be a mapping of pretrain.sweep axis -> values, got {typename(v)}")
        out = {}
        for axis, values in v.items():
            if axis not in axes:
                raise SpecError(f"{path}.{short(axis)}", f"is not a pretrain.sweep axis (axes: {', '.join(axes)})")
            swept = pretrain.sweep.get(axis, (getattr(pretrain.base, axis, None),))
            out[axis] = list_of(axes[axis])(f"{path}.{axis}", values)
            for i, x in enumerate(out[axis]):
                if x not in swept:
                    shown = ", ".join("full" if s is None else str(s) for s in swept)
                    problem = f"{short(x)} is not a value of pretrain.sweep.{axis} ({shown})"
                    raise SpecError(f"{path}.{axis}[{i}]", problem)
        return out

    def seed(path: str, v: Any) -> int:
        if integer(path, v, minimum=0) not in spec.seeds:
            raise SpecError(path, f"{v} is not one of transfer.seeds ({', '.join(map(str, spec.seeds))})")
        return v

    return dataclasses.replace(
        spec.finetune,
        only=f.get("only", only, {}),
        tasks=f.get("tasks", list_of(choice(spec.tasks or tasks)), ()),
        seeds=f.get("seeds", list_of(seed), None),
    )


def _finetune(path: str, data: Any) -> FinetuneSpec:
    f = Mapping(path, data, spec_keys(FinetuneSpec))
    spec = f.build(FinetuneSpec, readers={"only": as_is, "tasks": as_is, "seeds": as_is})
    search = f.data.get("search")
    if search is None:
        return spec
    for key in ("lr", "weight_decay"):  # one place per setting: the search's ranges replace these
        if key in f.data and key in (search if isinstance(search, dict) else {}):
            raise SpecError(f.at(key), f"is set both here and in transfer.finetune.search.{key}; keep one")
    if "lr" in f.data:
        raise SpecError(f.at("lr"), "a search samples the lr from transfer.finetune.search.lr; remove this grid")
    return dataclasses.replace(spec, search=_search(f.at("search"), search, spec))


def _search(path: str, data: Any, ft: FinetuneSpec) -> FinetuneSearch:
    s = Mapping(path, data, spec_keys(FinetuneSearch))
    algorithm = s.read(FinetuneSearch, "algorithm")

    def steps(q: str, v: Any) -> int:
        if integer(q, v, minimum=1) > ft.steps:
            raise SpecError(q, f"must be <= transfer.finetune.steps ({ft.steps}), got {v}")
        return v

    if algorithm != "asha":
        for key in ("grace_steps", "reduction_factor"):
            if key in s.data:
                raise SpecError(s.at(key), f"applies to algorithm asha only, not {algorithm}")
    grace = s.get("grace_steps", steps, max(1, ft.steps // 4))
    # Missing: the fine-tuning weight decay; null is refused like any other non-number.
    weight_decay = s.data.get("weight_decay", ft.weight_decay)
    return FinetuneSearch(
        algorithm=algorithm,
        num_samples=s.read(FinetuneSearch, "num_samples"),
        lr=s.read(FinetuneSearch, "lr"),
        weight_decay=reader_of(FinetuneSearch, "weight_decay")(s.at("weight_decay"), weight_decay),
        eval_every=s.get("eval_every", steps, grace),
        grace_steps=grace,
        reduction_factor=s.read(FinetuneSearch, "reduction_factor"),
        seed=s.read(FinetuneSearch, "seed"),
        max_concurrent_trials=s.read(FinetuneSearch, "max_concurrent_trials"),
    )


def _resources(path: str, data: Any) -> Resources:
    r = Mapping(path, data, spec_keys(Resources))
    use_gpu = r.read(Resources, "use_gpu")
    return r.build(Resources, readers={"light_trial_gpus": _light_trial_gpus(use_gpu)}, use_gpu=use_gpu)


def _light_trial_gpus(use_gpu: bool) -> Reader:
    share = reader_of(Resources, "light_trial_gpus")

    def read(path: str, v: Any) -> float:
        v = share(path, v)
        if not use_gpu:
            raise SpecError(path, "applies to GPU trials only: set resources.use_gpu: true, or remove it")
        return v

    return read


def _datamodels(
    path: str, data: Any, pretrain: Any, sources: dict[str, DataRef], tasks: dict[str, DataRef]
) -> DatamodelSpec:
    """``datamodels``; ``pretrain`` is the document's pretrain section as loaded."""
    d = Mapping(path, data, spec_keys(DatamodelSpec))
    if isinstance(pretrain, dict) and "sweep" in pretrain:
        raise SpecError(
            "pretrain.sweep",
            "a datamodels study draws its own class subsets (datamodels.class_fraction); remove the sweep",
        )
    if isinstance(pretrain, dict) and pretrain.get("method", PretrainSettings.method) != "supervised":
        raise SpecError(
            "pretrain.method", f"datamodel sweeps train supervised models only, got {short(pretrain['method'])}"
        )
    fraction = d.read(DatamodelSpec, "class_fraction")
    return d.build(
        DatamodelSpec, readers={"source": choice(tuple(sources)), "task": choice(tuple(tasks))}, class_fraction=fraction
    )
