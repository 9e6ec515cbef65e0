"""Typed configs: plain dataclasses whose fields carry their type and a description, validated by pydantic.

A config field reads ``name: Annotated[T, Field(description="...")] = default``; ``__pydantic_config__ = FORBID``
makes an unknown key an error. :func:`make_config` validates and converts a plain dict against it (``TypeAdapter``)
and then runs the config's own cross-field ``validate()``; its errors name the key. YAML 1.1 reads ``1e-4`` as a
string: :data:`Float` takes it; :data:`Int` and :data:`Float` never take ``true``/``false``, :data:`Bool` only a
boolean.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError

FORBID = ConfigDict(extra="forbid")  # a config's ``__pydantic_config__``: an unknown key is an error


def no_bool(value: Any) -> Any:
    """A before-validator that refuses a boolean where a number belongs (pydantic's lax mode would take it)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Int = Annotated[int, BeforeValidator(no_bool)]
Float = Annotated[float, BeforeValidator(no_bool)]
Bool = StrictBool
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(no_bool)]  # the constraint first: schemas show it


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def field_description(config_cls: type, name: str) -> str:
    """A config field's description (its ``Field(description=...)``), '' when it has none."""
    hint = typing.get_type_hints(config_cls, include_extras=True).get(name)
    for meta in getattr(hint, "__metadata__", ()):
        if getattr(meta, "description", None):
            return str(meta.description)
    return ""


@functools.cache
def adapter(config_cls: type) -> TypeAdapter:
    return TypeAdapter(config_cls)


def error_text(e: ValidationError, fields: typing.Iterable[str] = ()) -> str:
    """pydantic's errors as ``key 'a.b': message`` lines; an unknown key names the allowed ones."""
    out = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            out.append(f"unknown key {loc!r}; allowed: {sorted(fields)}")
        else:
            got = err.get("input")
            out.append(f"key {loc!r}: {err['msg'].removeprefix('Value error, ')}, got {got!r}")
    return "; ".join(out)


def make_config(config_cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build a hyperparameter dataclass from a plain dict, naming the offending key on error."""
    try:
        cfg = adapter(config_cls).validate_python(dict(values))
    except ValidationError as e:
        raise ValueError(f"{where}: {error_text(e, config_fields(config_cls))}") from None
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return cfg
