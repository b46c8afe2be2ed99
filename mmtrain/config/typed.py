"""Typed specs: recipe dataclasses checked by pydantic against their annotations, errors named by dotted path.

Every recipe dataclass derives from `Spec` and stays a plain dataclass; pydantic (a `TypeAdapter` over the class)
checks each field against its annotation — int, float, bool, str, Literal choices, `X | None`, unions, lists, tuples,
mappings, nested specs — and converts where YAML is loose: `3e-5`, a string to YAML 1.1, becomes a float, an integral
float an int, a list a tuple. Booleans are strict (`Bool`: true or false, never yes, on or 1) and a bool is never an
integer or a number (`Int`, `Float`). `build` makes a spec from a mapping; a spec made in Python is checked the same
way. Every error is a `FieldError` that names the dotted path at fault (`stages.1.optimizer.lr: expected a number, got
'abc'`), so a typo deep in a recipe is reported where it is.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Annotated, Any

from pydantic import BeforeValidator, GetCoreSchemaHandler, StrictBool, TypeAdapter, ValidationError
from pydantic_core import PydanticKnownError, core_schema

from mmtrain.errors import UserError


class FieldError(UserError, ValueError):
    """A bad key or value at a dotted path. `sep` joins path and reason: ": " for "path: expected …", " " for
    "path must be …". A ValueError too: pydantic then reports one raised by a spec's `check` at the spec's place."""

    def __init__(self, path: tuple[str, ...], reason: str, sep: str = ": ") -> None:
        self.path, self.reason, self.sep = tuple(path), reason, sep
        dotted = ".".join(self.path)
        super().__init__(f"{dotted}{sep}{reason}" if dotted else reason)

    def under(self, prefix: tuple[str, ...]) -> "FieldError":
        """The same error, placed below `prefix` in the tree."""
        return FieldError(tuple(prefix) + self.path, self.reason, self.sep)


def _refuse(*types: type, error: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, types):
            raise PydanticKnownError(error)
        return value
    return BeforeValidator(check)


Bool = StrictBool
"""true or false (YAML 1.1's yes, on and 1 are refused)."""
Int = Annotated[int, _refuse(bool, str, error="int_type")]
"""An integer, an integral float (`1.0e7`) too; never a bool or a string."""
Float = Annotated[float, _refuse(bool, error="float_type")]
"""A number, a string that reads as one too (YAML 1.1 reads `3e-5` as a string); never a bool."""

EXPECTED = {"bool_type": "true or false", "int_type": "an integer", "int_parsing": "an integer",
            "int_from_float": "an integer", "float_type": "a number", "float_parsing": "a number",
            "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
            "dataclass_type": "a mapping"}
"""pydantic's error type → what the value should have been, as our messages say it."""

_BUILDING = contextvars.ContextVar("_BUILDING", default=False)
"""True while `build` runs: a spec pydantic makes has its fields checked already."""


def choices_text(choices: tuple[Any, ...]) -> str:
    """("a", "b", "c") → "a, b or c"."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class Spec:
    """Base of every recipe dataclass: fields are checked against their annotations when an instance is made, then
    `check` runs the rules that tie fields together."""

    def __post_init__(self) -> None:
        if _BUILDING.get():
            self.check()
        else:  # made in Python: checked as if read from YAML
            vars(self).update(vars(build(type(self), dict(vars(self)))))

    def check(self) -> None:
        """Rules across fields; raise FieldError with the path relative to this spec."""

    @classmethod
    def expand(cls, raw: Any) -> Any:
        """A shorthand in YAML → the full mapping (e.g. a data source written as its directory alone)."""
        return raw

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        """pydantic's schema of the dataclass, after `expand` and a check for unknown keys that names the known."""
        return core_schema.no_info_before_validator_function(cls._known_keys, handler(source))

    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        raw = cls.expand(raw)
        known = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        unknown = sorted((k for k in raw if k not in known), key=str) if isinstance(raw, dict) else []
        if unknown:
            raise FieldError((), f"unknown keys {unknown} (known: {known})")
        return raw


def at_least(spec: Spec, name: str, low: float) -> None:
    """FieldError unless `spec.name` (when set) is at least `low`."""
    value = getattr(spec, name)
    if value is not None and value < low:
        raise FieldError((name,), f"must be >= {low}, not {value!r}", sep=" ")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def build(cls: type, raw: Any) -> Any:
    """A spec of type `cls` from a mapping: unknown and missing keys, and every bad value, name their path."""
    token = _BUILDING.set(True)
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise _field_error(exc.errors(include_url=False), raw) from None
    finally:
        _BUILDING.reset(token)


def _field_error(errors: list[Any], raw: Any) -> FieldError:
    """pydantic's first error as a FieldError at its place in `raw`. The arms of a union that all failed there are
    named together; where an arm failed deeper (the value has its shape, one item is wrong), that item is named."""
    places = [_place(e["loc"], raw) for e in errors]
    path = max((p for p in places if p[:len(places[0])] == places[0]), key=len)
    here = [e for p, e in zip(places, errors) if p == path]
    first = here[0]
    kind, value = first["type"], first["input"]
    if isinstance(first.get("ctx", {}).get("error"), FieldError):
        return first["ctx"]["error"].under(path)
    if kind == "too_long" or kind == "missing" and isinstance(first["loc"][-1], int):  # a tuple's length
        n = first["ctx"]["max_length"] if kind == "too_long" else len(value) + len(here)
        return FieldError(path, f"expected a list of {n} values, got {value!r}")
    if kind == "missing":
        return FieldError(path, f"missing {', '.join(str(e['loc'][-1]) for e in here)}")
    if kind == "literal_error":
        choices = first["ctx"]["expected"].replace("'", "")
        if first["loc"][-1] == "[key]":  # a mapping's key: the path names the mapping
            return FieldError(path[:-1], f"unknown key {value!r} (keys: {choices})")
        return FieldError(path, f"must be {choices}, not {value!r}", sep=" ")
    if all(e["type"] in EXPECTED for e in here):
        return FieldError(path, f"expected {' or '.join(dict.fromkeys(EXPECTED[e['type']] for e in here))}, got "
                                f"{value!r}")
    return FieldError(path, f"{first['msg']}, got {value!r}")


def _place(loc: tuple[Any, ...], raw: Any) -> tuple[str, ...]:
    """The keys of pydantic's `loc` that are places in `raw`; the tags pydantic adds (a union's arm, `[key]` for a
    mapping's key) are not."""
    path: list[str] = []
    for key in loc:
        if isinstance(raw, dict) and key in raw or (isinstance(raw, (list, tuple)) and isinstance(key, int)
                                                    and 0 <= key < len(raw)):
            raw = raw[key]
            path.append(str(key))
    return tuple(path)


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
