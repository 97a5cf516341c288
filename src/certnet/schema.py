"""Declared schemas for everything certnet reads from a file: a checkpoint's ``config.json``,
training configs and YAML presets, layer specs, method and architecture options.

A schema is a pydantic model: derived from a typed signature (:func:`signature_schema`), a
dataclass (:func:`dataclass_schema`) or a field table (:func:`fields_schema`). Values are
checked as the JSON they are (strict: no coercion, a bool is never a number, an int is a
number, floats finite, arrays for tuples, unknown keys refused); a violation is one
``ConfigError`` line naming the field. The checked values are used as given, never converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from certnet.errors import ConfigError

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, protected_namespaces=())
#: an integer >= 1, an integer >= 0, a finite number >= 0, a fraction in [0, 1], a number of
#: iterations (capped: a config must not make a command run for ever)
Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Iterations = Annotated[int, Field(ge=0, le=100_000)]
#: pydantic's tag for a member of a union in an error location (e.g. ``int``, ``list[int]``)
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|.*\[.*\]|function-.*|constrained-.*)$")


def _path(error: Any) -> list[Any]:
    return [p for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]


def problem(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line for a pydantic error: the first failing field's dotted path and what is wrong
    (the alternatives of a union joined by "or"; for an unknown key of ``schema``, the
    allowed ones)."""
    errors = err.errors()
    path = _path(errors[0])
    same = [e for e in errors if _path(e) == path]
    what = " or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in same))
    if errors[0]["type"] == "extra_forbidden" and len(path) == 1:
        near = difflib.get_close_matches(str(path[0]), schema.model_fields, 1)
        allowed = f"allowed: {sorted(schema.model_fields)}" if schema.model_fields else \
            "it takes none"
        what = f"unknown key{f' (did you mean {near[0]!r}?)' if near else ''}; {allowed}"
    field, got = ".".join(map(str, path)), repr(same[0].get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{f'field {field!r}: ' if field else ''}{what} (got {got})"


def validate(schema: type[BaseModel], values: Any, where: str) -> None:
    """ConfigError ``"where: field 'a.b': problem (got value)"`` unless ``values`` (a JSON-able
    mapping; objects JSON cannot hold pass only where the schema says Any) fit ``schema``."""
    try:
        schema.model_validate_json(json.dumps(values, default=lambda _: None))
    except ValidationError as err:
        raise ConfigError(f"{where}{': ' if where else ''}{problem(err, schema)}") from None
    except ValueError as err:  # e.g. a circular reference in a hand-built mapping
        raise ConfigError(f"{where}{': ' if where else ''}not a JSON value: {err}") from None


def fields_schema(name: str, fields: dict[str, Any]) -> type[BaseModel]:
    """A schema requiring every field of ``fields`` (name -> type)."""
    return create_model(name, __config__=STRICT, **{k: (t, ...) for k, t in fields.items()})


@cache
def signature_schema(function: Callable[..., Any], supplied: tuple[str, ...] = (),
                     complete: bool = False) -> type[BaseModel]:
    """The keyword arguments of ``function`` besides ``supplied`` (which certnet passes
    itself), with their annotations (Any where none) and defaults (none if ``complete``:
    every argument must then be given)."""
    hints = get_type_hints(function, include_extras=True)
    fields = {}
    params = inspect.signature(function).parameters.values()
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            return create_model(function.__qualname__, __config__={**STRICT, "extra": "allow"})
        if p.name not in supplied and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            default = ... if p.default is p.empty or complete else p.default
            fields[p.name] = (hints.get(p.name, Any), default)
    return create_model(function.__qualname__, __config__=STRICT, **fields)


@cache
def dataclass_schema(cls: type) -> type[BaseModel]:
    """The fields of dataclass ``cls`` with their annotations and defaults."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {}
    for f in dataclasses.fields(cls):
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        fields[f.name] = (hints[f.name], ... if default is dataclasses.MISSING else default)
    return create_model(cls.__name__, __config__=STRICT, **fields)
