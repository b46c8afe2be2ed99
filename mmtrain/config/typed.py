"""Typed specs: a dataclass's fields checked against their annotations, nested specs built from YAML mappings.

Every recipe dataclass derives from `Spec`: after construction each field is checked (and, where YAML is loose,
converted: `3e-5` read as a string becomes a float, a list becomes a tuple) against its annotation — int, float, bool,
str, Literal choices, `X | None`, unions, lists, tuples, mappings, nested specs. `build` makes a spec from a mapping.
Every error is a `FieldError` that names the dotted path at fault (`stages.1.optimizer.lr: expected a number, got
'abc'`), so a typo deep in a recipe is reported where it is.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from mmtrain.errors import UserError


class FieldError(UserError):
    """A bad key or value at a dotted path. `sep` joins path and reason: ": " for "path: expected …", " " for
    "path must be …"."""

    def __init__(self, path: tuple[str, ...], reason: str, sep: str = ": ") -> None:
        self.path, self.reason, self.sep = tuple(path), reason, sep
        dotted = ".".join(self.path)
        super().__init__(f"{dotted}{sep}{reason}" if dotted else reason)

    def under(self, prefix: tuple[str, ...]) -> "FieldError":
        """The same error, placed below `prefix` in the tree."""
        return FieldError(tuple(prefix) + self.path, self.reason, self.sep)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved annotations (the specs use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def choices_text(choices: tuple[Any, ...]) -> str:
    """("a", "b", "c") → "a, b or c"."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, for an error message."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arm) for arm in get_args(hint))
    if origin is Literal:
        return choices_text(get_args(hint))
    if origin in (list, tuple):
        n = len(get_args(hint))
        return f"a list of {n} values" if origin is tuple else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__}"
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, "anything" if hint is Any else str(hint))


def coerce(hint: Any, value: Any, path: tuple[str, ...] = ()) -> Any:
    """`value` as type `hint` (numbers written as YAML 1.1 strings become floats, integral floats ints, lists
    tuples); a FieldError at `path` when it is not one."""
    if hint is Any:
        return value
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(hint, value, path)
    if origin is Literal:
        if value in get_args(hint) and not isinstance(value, bool):
            return value
        raise FieldError(path, f"must be {choices_text(get_args(hint))}, not {value!r}", sep=" ")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
    elif origin is list and isinstance(value, (list, tuple)):
        (item,) = get_args(hint) or (Any,)
        return [coerce(item, v, path + (str(i),)) for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(get_args(hint)):
        return tuple(coerce(arm, v, path + (str(i),)) for i, (arm, v) in enumerate(zip(get_args(hint), value)))
    elif origin is dict and isinstance(value, dict):
        key_type, value_type = get_args(hint) or (Any, Any)
        return {_coerce_key(key_type, k, path): coerce(value_type, v, path + (str(k),)) for k, v in value.items()}
    elif hint in (bool, int, float, str):
        converted = _scalar(hint, value)
        if converted is not None:
            return converted
    raise FieldError(path, f"expected {describe(hint)}, got {value!r}")


def _coerce_union(hint: Any, value: Any, path: tuple[str, ...]) -> Any:
    arms = get_args(hint)
    if value is None and type(None) in arms:
        return None
    for arm in arms:
        if arm is type(None):
            continue
        try:
            return coerce(arm, value, path)
        except FieldError as exc:
            if exc.path != path:  # the value has the arm's shape, one of its items is wrong: say which
                raise
    raise FieldError(path, f"expected {describe(hint)}, got {value!r}")


def _coerce_key(key_type: Any, key: Any, path: tuple[str, ...]) -> Any:
    if get_origin(key_type) is Literal and key not in get_args(key_type):
        raise FieldError(path, f"unknown key {key!r} (keys: {', '.join(get_args(key_type))})")
    return coerce(key_type, key, path + (str(key),))


def _scalar(hint: type, value: Any) -> Any:
    """`value` as the scalar type `hint`, or None when it is not one (bool is never an int or a number here)."""
    if isinstance(value, bool):
        return value if hint is bool else None
    if hint is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else None
    if hint is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `3e-5` (no dot) as a string: the user meant a number
            except ValueError:
                return None
        return None
    return value if isinstance(value, hint) else None


class Spec:
    """Base of every recipe dataclass: fields are checked against their annotations when an instance is made, then
    `check` runs the rules that tie fields together."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, coerce(hints[f.name], getattr(self, f.name), (f.name,)))
        self.check()

    def check(self) -> None:
        """Rules across fields; raise FieldError with the path relative to this spec."""

    @classmethod
    def expand(cls, raw: Any) -> Any:
        """A shorthand in YAML → the full mapping (e.g. a data source written as its directory alone)."""
        return raw


def at_least(spec: Spec, name: str, low: float) -> None:
    """FieldError unless `spec.name` (when set) is at least `low`."""
    value = getattr(spec, name)
    if value is not None and value < low:
        raise FieldError((name,), f"must be >= {low}, not {value!r}", sep=" ")


def build(cls: type, raw: Any, path: tuple[str, ...] = ()) -> Any:
    """A spec of type `cls` from a mapping: unknown and missing keys, and every bad value, name their path."""
    if isinstance(raw, cls):
        return raw
    raw = cls.expand(raw)
    if not isinstance(raw, dict):
        raise FieldError(path, f"expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=str)
    if unknown:
        raise FieldError(path, f"unknown keys {unknown} (known: {sorted(fields)})")
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FieldError(path, f"missing {', '.join(missing)}")
    hints = type_hints(cls)
    kwargs = {key: _nested(hints[key], value, path + (key,)) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise exc.under(path) from None


def _nested(hint: Any, value: Any, path: tuple[str, ...]) -> Any:
    """Mappings under a spec-typed field (or a list of specs) built into specs; anything else left to `coerce`."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if get_origin(hint) is list and isinstance(value, list):
        (item,) = get_args(hint) or (Any,)
        if dataclasses.is_dataclass(item):
            return [build(item, v, path + (str(i),)) for i, v in enumerate(value)]
    return value


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default as plain data (nested specs as mappings); fields without a default are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    return out


def plain(value: Any) -> Any:
    """Specs, tuples and mappings → mappings and lists (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
