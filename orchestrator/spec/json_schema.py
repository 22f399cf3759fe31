"""A JSON Schema (draft 2020-12) of study files, for editors: key completion, types and
defaults as you type (`transferlab schema > study.schema.json`, then point the YAML language
server at it with ``# yaml-language-server: $schema=study.schema.json``).

It is derived from the dataclasses of :mod:`orchestrator.spec.schema` — the same fields,
defaults and comments the reader uses — and is deliberately looser than the reader: it checks
keys and types, while ranges, names and cross-field rules stay the reader's (`transferlab
validate`). A list field also takes a single value, as the reader does.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from orchestrator.spec.claims import CLAIM_KINDS, EXPECT, REMOVAL_ARMS, VERSUS
from orchestrator.spec.fields import spec_keys
from orchestrator.spec.schema import (
    COLUMN_KEYS,
    PACK_MODES,
    DataRef,
    FinetuneSpec,
    PretrainSettings,
    PretrainSpec,
    StudySpec,
    ViewAxes,
)

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_CLASS_NAME = {"type": ["string", "integer"]}  # YAML reads class 7 as an int; the reader takes it
# Fields whose reader takes more than their annotation says.
_READS = {
    (ViewAxes, "pretrain_size"): {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "full"}, {"type": "null"}]},
    (DataRef, "keep_classes"): {"anyOf": [{"type": "null"}, _CLASS_NAME, {"type": "array", "items": _CLASS_NAME}]},
    (PretrainSpec, "pack"): {"enum": list(PACK_MODES)},
    (FinetuneSpec, "only"): {"type": "object"},  # pretrain.sweep axis -> values
    (DataRef, "drop_classes"): {"anyOf": [_CLASS_NAME, {"type": "array", "items": _CLASS_NAME}]},
}
# A datamodels study needs no pretrain or transfer section; the reader says what else is needed.
_REQUIRED = {StudySpec: ["study", "sources", "tasks"]}


def _scalar_or_list(item: dict) -> dict:
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}


def _type(tp) -> dict:
    """The JSON Schema of a field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type(a) for a in args]}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is tuple or origin in (tuple, list):
        fixed = args and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed:
            return {"type": "array", "prefixItems": [_type(a) for a in args], "minItems": len(args)}
        return _scalar_or_list(_type(args[0]) if args else {})
    if origin is dict:
        return {"type": "object", "additionalProperties": _type(args[1])}
    if dataclasses.is_dataclass(tp):
        return _object(tp)
    return {}


def _properties(cls) -> dict:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key in spec_keys(cls):
        f = fields[key]
        prop = dict(_READS.get((cls, key)) or _type(hints[key]))
        if f.default is not dataclasses.MISSING and isinstance(f.default, (str, int, float, bool, type(None))):
            prop["default"] = f.default
        out[key] = prop
    return out


def _required(cls) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return [
        k
        for k in spec_keys(cls)
        if fields[k].default is dataclasses.MISSING and fields[k].default_factory is dataclasses.MISSING
    ]


def _object(cls, extra: dict | None = None, required: list[str] | None = None) -> dict:
    out = {
        "type": "object",
        "properties": {**_properties(cls), **(extra or {})},
        "additionalProperties": False,
    }
    req = _REQUIRED.get(cls, _required(cls)) if required is None else required
    if req:
        out["required"] = req
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    return out


def _pretrain() -> dict:
    """``pretrain``: the base settings, and ``sweep`` — one grid or a list of grids, each axis
    (``source``, a view axis or any setting) a value or a list of values."""
    axes = {"source": _scalar_or_list({"type": "string"})}
    for cls in (ViewAxes, PretrainSettings):
        for key, prop in _properties(cls).items():
            prop = {k: v for k, v in prop.items() if k != "default"}
            axes[key] = prop if "anyOf" in prop and prop["anyOf"][-1].get("type") == "array" else _scalar_or_list(prop)
    grid = {"type": "object", "properties": axes, "additionalProperties": False}
    sweep = {"anyOf": [grid, {"type": "array", "items": grid, "minItems": 1}]}
    return _object(PretrainSettings, {"sweep": sweep, **_properties(PretrainSpec)}, required=[])


_PARAM_TYPES = {
    "task": {"type": "string"},
    "source": {"type": "string"},
    "layer": {"type": "string"},
    "shots": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "full"}]},
    "label_noise": {"type": "number", "minimum": 0, "maximum": 1},
    "margin": {"type": "number", "minimum": 0, "maximum": 1},
    "head_weight_decay": {"type": "number", "minimum": 0},
    "expect": {"enum": list(EXPECT)},
    "class": {"type": "string", "minLength": 1},
    "arm": {"enum": list(REMOVAL_ARMS)},
    "k": {"type": "integer", "minimum": 1},
    "versus": {"enum": list(VERSUS)},
}


def _claims() -> dict:
    """``claims``: a list of claims, each one of the kinds of orchestrator.spec.claims."""
    kinds = []
    for kind, (what, params) in CLAIM_KINDS.items():
        props = {"kind": {"const": kind}, "name": {"type": "string"}}
        props |= {k: {**_PARAM_TYPES[p.ref], "description": p.doc} for k, p in params.items()}
        required = ["kind", *(k for k, p in params.items() if p.required)]
        kinds.append(
            {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
                "description": what,
            }
        )
    return {"type": "array", "items": {"oneOf": kinds}, "description": "pre-registered claims `report` judges"}


def json_schema() -> dict:
    """The JSON Schema of a study file."""
    columns = {k: {"type": "string"} for k in COLUMN_KEYS}
    source = _object(DataRef, columns)
    task = {
        "type": "object",
        "properties": {k: source["properties"][k] for k in ("uri", "allow_compressed")} | columns,
        "required": ["uri"],
        "additionalProperties": False,
    }
    spec = _object(
        StudySpec,
        {
            "sources": {"type": "object", "additionalProperties": source, "minProperties": 1},
            "tasks": {"type": "object", "additionalProperties": task},
            "pretrain": _pretrain(),
            "claims": _claims(),
            "quick": {
                "type": "object",
                "description": "key.path: value overrides applied by --quick (a toy-size variant, named STUDY-quick)",
            },
        },
    )
    return {"$schema": SCHEMA_URI, "title": "transferlab study", **spec}
