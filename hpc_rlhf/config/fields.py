"""Declaring config fields: a default, a one-line doc and a constraint, in one call.

`opt(default, doc, ge=0, choices=(...))` puts the doc and constraint in the dataclass field's
metadata; `field_errors` checks one dataclass instance against them and returns messages that
name the field, the value, the constraint and the fix.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


def opt(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with its documentation and constraints (tuples stay immutable)."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def field_errors(obj: Any, prefix: str) -> list[str]:
    """Constraint violations of every field of dataclass `obj`, named `prefix.field`."""
    errors = []
    for f in dataclasses.fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{name}={value!r} must be a finite number; give a real value")
            continue
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            errors.append(f"{name}={value!r} is not one of {list(choices)}; pick one of them")
            continue
        for key, ok, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                               ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            bound = meta.get(key)
            if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
                errors.append(f"{name}={value!r} must be {words} {bound}; "
                              f"set {name} to a value {words} {bound}")
        check = meta.get("check")
        if check is not None:
            msg = check(value)
            if msg:
                errors.append(f"{name}={value!r} {msg}")
    return errors


def doc_of(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("doc", "")
    raise KeyError(name)
