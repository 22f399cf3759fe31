"""Study files: reading the YAML strictly, ``--quick`` and ``KEY=VALUE`` overrides, then
:func:`~orchestrator.spec.parse.parse_spec`."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from datasets_.objstore import is_remote
from orchestrator.spec.fields import SpecError, short, typename
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.schema import StudySpec

QUICK_SUFFIX = "-quick"
MAX_STUDY_BYTES = 1 << 20  # a study file is a page of YAML; PyYAML parses ~50 kB/s of dense lists


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a duplicated source or setting would vanish without a word) and refuses
    aliases (``*name``): nested aliases expand exponentially ("billion laughs": 560 bytes took
    12 s and 300 MB), and a study file never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor[:40]}) are not allowed in study files", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the mapping check of the spec reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a loaded study document."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(item, "override must look like key.path=value")
        try:
            parsed = yaml.load(value, Loader=_StrictLoader)
        except (yaml.YAMLError, RecursionError):
            raise SpecError(key, f"cannot parse override value {short(value)}") from None
        _set_path(data, key.split("."), parsed)
    return data


def _set_path(node: dict, parts: list[str], value: Any) -> None:
    """``node[a][b]... = value``, making missing mappings; through a list of mappings (a list of
    grids, ``pretrain.sweep.seed=[0,1]``) it sets the rest of the path in every one."""
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, list) and child and all(isinstance(x, dict) for x in child):
            for x in child:
                _set_path(x, parts[i + 1 :], copy.deepcopy(value))
            return
        if not isinstance(child, dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_quick(data: dict, quick: bool) -> dict:
    """Drop the document's ``quick:`` section; with ``quick``, apply it first: each ``key.path:
    value`` replaces that field (as a KEY=VALUE override would), and the study is renamed
    STUDY-quick so toy runs never mix with the real study's in MLflow."""
    section = data.pop("quick", None)
    if not quick:
        return data
    if section is None:
        raise SpecError(
            "--quick", "this study file has no 'quick:' section (key.path: value fields for a toy-size run)"
        )
    if not isinstance(section, dict) or not section:
        raise SpecError("quick", f"must be a non-empty mapping of key.path -> value, got {typename(section)}")
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
        size = path.stat().st_size
        if size > MAX_STUDY_BYTES:
            raise SpecError(str(path), f"the study file is {size} bytes, above the limit of {MAX_STUDY_BYTES}")
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
    from datasets_.builtin import is_builtin  # numpy, PIL, pyarrow: not for commands that only parse arguments

    for group in (spec.sources, spec.tasks):
        for name, ref in group.items():
            if not is_remote(ref.uri) and not is_builtin(ref.uri) and not Path(ref.uri).is_absolute():
                group[name] = dataclasses.replace(ref, uri=str((path.parent / ref.uri).resolve()))
    return spec


def resolved_document(spec: StudySpec) -> dict:
    """The study file as it runs: its document after overrides and ``--quick``, with every data
    path resolved (what ``transferlab config`` prints and the study run stores)."""
    doc = copy.deepcopy(spec.raw)
    for section, refs in (("sources", spec.sources), ("tasks", spec.tasks)):
        for name, ref in refs.items():
            body = doc[section][name]
            doc[section][name] = ref.uri if isinstance(body, str) else {**body, "uri": ref.uri}
    return doc
