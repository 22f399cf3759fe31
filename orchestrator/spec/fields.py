"""Reading YAML values into checked Python values, and dataclasses from YAML mappings.

A *reader* is a function ``read(path, value) -> checked value`` that raises :class:`SpecError`
naming ``path`` (the dotted field path) when the value is wrong. The readers here are generic;
:mod:`orchestrator.spec.schema` declares which one reads each field, next to the field's default::

    @dataclass(frozen=True)
    class Budget:
        max_hours: float | None = spec_field(None, read=positive_number)

and :func:`read_dataclass` (or :meth:`Mapping.build`) reads every declared field of a mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
from collections.abc import Callable
from typing import Any

Reader = Callable[[str, Any], Any]

INT_MAX = 2**31 - 1  # no count or seed in a study is larger; bigger ints are typos or attacks
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class SpecError(ValueError):
    """A study spec problem, phrased as ``FIELD: what is wrong``; ``field`` is the dotted path."""

    def __init__(self, field_path: str, problem: str):
        if len(field_path) > 120:  # a path holds the user's keys, which may be huge
            field_path = field_path[:117] + "..."
        self.field = field_path
        super().__init__(f"{field_path}: {problem}")


def typename(v: Any) -> str:
    """The YAML word for a value's type (``mapping``, ``list``, ``string``, ``null``, ``int`` ...)."""
    if v is None:
        return "null"
    return {"dict": "mapping", "list": "list", "str": "string"}.get(type(v).__name__, type(v).__name__)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 58, 58


def short(v: Any) -> str:
    """repr of a value, cut to fit one error line; never the repr of the whole value, which may
    be huge or hostile (a repr of a few levels and elements, then cut)."""
    text = _SHORT.repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Readers.


def integer(path: str, v: Any, minimum: int | None = None, maximum: int = INT_MAX) -> int:
    """An int (not a bool) in [minimum, maximum]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(path, f"must be an integer, got {typename(v)} {short(v)}")
    if minimum is not None and v < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {short(v)}")
    if v > maximum:
        raise SpecError(path, f"must be <= {maximum}, got {short(v)}")
    return v


def int_in(minimum: int | None = None, maximum: int = INT_MAX) -> Reader:
    """A reader of :func:`integer` in [minimum, maximum]."""
    return lambda path, v: integer(path, v, minimum, maximum)


def number(path: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A finite int or float (not a bool), as a float, in [lo, hi] (either bound optional)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(path, f"must be a number, got {typename(v)} {short(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise SpecError(path, f"must be a finite number, got {short(v)}") from None
    if v != v:
        raise SpecError(path, "must be a number, got NaN")
    if v in (float("inf"), float("-inf")):
        raise SpecError(path, f"must be a finite number, got {v}")
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise SpecError(path, f"must be in [{lo:g}, {hi:g}], got {v:g}")
    if lo is not None and v < lo:
        raise SpecError(path, f"must be >= {lo:g}, got {v:g}")
    return v


def number_in(lo: float | None = None, hi: float | None = None) -> Reader:
    """A reader of :func:`number` in [lo, hi]."""
    return lambda path, v: number(path, v, lo, hi)


def positive_number(path: str, v: Any) -> float:
    """A :func:`number` above 0."""
    v = number(path, v)
    if v <= 0:
        raise SpecError(path, f"must be > 0, got {v:g}")
    return v


def boolean(path: str, v: Any) -> bool:
    """true or false (not 0 / 1 / "yes")."""
    if not isinstance(v, bool):
        raise SpecError(path, f"must be true or false, got {typename(v)} {short(v)}")
    return v


def string(path: str, v: Any) -> str:
    """A string that is not blank."""
    if not isinstance(v, str) or not v.strip():
        raise SpecError(path, f"must be a non-empty string, got {typename(v)} {short(v)}")
    return v


def data_uri(path: str, v: Any) -> str:
    """A local path or object-store URI without a query string or credentials: pyarrow honours
    ``?endpoint_override=HOST`` (data and checkpoints would go to whoever HOST is) and
    ``KEY:SECRET@`` would be printed, logged and stored with the study. Endpoints and
    credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...)."""
    v = string(path, v)
    scheme, sep, rest = v.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        raise SpecError(
            path, "must not carry credentials (USER:SECRET@): set them in the environment (AWS_* variables)"
        )
    if sep and ("?" in rest or "#" in rest):
        raise SpecError(
            path,
            "must not carry a query string (?...): set the endpoint in the environment (AWS_ENDPOINT_URL) and name "
            "the bucket and prefix only",
        )
    return v


def name(path: str, v: Any) -> str:
    """A name that is safe in run names, file names and MLflow: letters, digits, ``_ . -``."""
    v = string(path, v)
    if len(v) > 128:
        raise SpecError(path, f"must be at most 128 characters, got {len(v)}")
    if not _NAME.fullmatch(v):
        raise SpecError(
            path, f"{short(v)} may hold only letters, digits, '_', '.', '-' and must start with a letter or digit"
        )
    return v


def choice(options: tuple[str, ...]) -> Reader:
    """A reader of one of ``options``; a near miss gets a did-you-mean hint."""

    def read(path: str, v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            hint = difflib.get_close_matches(v, options, n=1) if isinstance(v, str) and len(v) < 100 else []
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SpecError(path, f"unknown value {short(v)}{extra}; choose from: {', '.join(options)}")
        return v

    return read


def listed(path: str, v: Any, item: Reader) -> tuple:
    """A non-empty list without duplicates, each element read by ``item`` (``path[i]``), as a
    tuple; a scalar is a one-element list."""
    if not isinstance(v, list):
        v = [v]  # a scalar is a one-element grid
    if not v:
        raise SpecError(path, "must not be empty")
    out = tuple(item(f"{path}[{i}]", x) for i, x in enumerate(v))
    seen = set()
    for i, x in enumerate(out):
        if x in seen:
            raise SpecError(f"{path}[{i}]", f"duplicate value {short(v[i])}")
        seen.add(x)
    return out


def list_of(item: Reader) -> Reader:
    """A reader of :func:`listed` with ``item``."""
    return lambda path, v: listed(path, v, item)


def as_is(path: str, v: Any) -> Any:
    """The value unchecked, for a section whose reader checks it afterwards."""
    return v


# ---------------------------------------------------------------------------------------------
# Dataclasses from mappings.


def spec_field(
    default: Any = dataclasses.MISSING,
    *,
    read: Reader | None = None,
    default_factory: Any = dataclasses.MISSING,
    **kwargs: Any,
) -> Any:
    """A dataclass field that is a key of the YAML mapping, read by ``read`` (None: a section
    reader of :mod:`orchestrator.spec.parse` reads it). Without a default the key is required."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"read": read}, **kwargs)


def spec_keys(cls: type) -> tuple[str, ...]:
    """The YAML keys of a dataclass: its :func:`spec_field` fields, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if "read" in f.metadata)


def reader_of(cls: type, key: str) -> Reader:
    """The reader declared for field ``key`` of ``cls``."""
    read = next(f for f in dataclasses.fields(cls) if f.name == key).metadata.get("read")
    if read is None:
        raise TypeError(f"{cls.__name__}.{key} declares no reader")
    return read


def section(cls: type) -> Reader:
    """A reader of a nested mapping into ``cls`` (see :func:`read_dataclass`)."""
    return lambda path, v: read_dataclass(cls, path, v)


def read_dataclass(cls: type, path: str, data: Any, readers: dict[str, Reader] | None = None, **given: Any) -> Any:
    """``cls`` from the YAML mapping ``data`` at ``path``: refuses keys that are not its
    :func:`spec_keys`, then see :meth:`Mapping.build`."""
    return Mapping(path, data, spec_keys(cls)).build(cls, readers, **given)


_REQUIRED = object()


class Mapping:
    """One YAML mapping, read key by key; keys outside ``allowed`` are refused up front."""

    def __init__(self, path: str, data: Any, allowed: tuple[str, ...]):
        if not isinstance(data, dict):
            raise SpecError(path or "study file", f"must be a mapping, got {typename(data)}")
        for k in data:
            if not isinstance(k, str):
                raise SpecError(self._join(path, short(k)), "keys must be strings")
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1) if len(k) < 100 else []
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(allowed)}"
                raise SpecError(self._join(path, k), f"unknown key{extra}")
        self.path, self.data = path, data

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def at(self, key: str) -> str:
        """The dotted path of ``key``."""
        return self._join(self.path, key)

    def get(self, key: str, read: Reader, default: Any = _REQUIRED) -> Any:
        """``key``'s value read by ``read``; ``default`` when the key is missing or null (without
        one, SpecError ``is required``)."""
        if self.data.get(key) is None:
            if default is _REQUIRED:
                raise SpecError(self.at(key), "is required")
            return default
        return read(self.at(key), self.data[key])

    def read(self, cls: type, key: str, read: Reader | None = None) -> Any:
        """Field ``key`` of dataclass ``cls``: read by ``read`` or else its declared reader, its
        default when missing or null (required when it has none)."""
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _REQUIRED
        return self.get(key, read or reader_of(cls, key), default)

    def build(self, cls: type, readers: dict[str, Reader] | None = None, **given: Any) -> Any:
        """``cls`` from this mapping, field by field in declaration order: ``given`` values as they
        are; fields with a reader (``readers[key]`` first, else the declared one) by :meth:`read`;
        every other field at its default."""
        readers = readers or {}
        names = {f.name for f in dataclasses.fields(cls)}
        if not set(given) | set(readers) <= names:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(set(given) | set(readers) - names))}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = given[f.name]
            elif f.name in readers or f.metadata.get("read") is not None:
                values[f.name] = self.read(cls, f.name, readers.get(f.name))
        return cls(**values)
