"""Typed settings: build a config dataclass from a dict (a --config file, CLI flags, config.json).

One helper for every config dataclass: unknown keys are listed with the known ones, values are
checked against the field annotations (int, float (an int is accepted), str, bool, list of str,
dict with str keys, None where the annotation allows it; a bool is not a number), and a number
written as text ("1e-3", as PyYAML reads it) is read as the number. :func:`merge_settings` gives
the precedence defaults < config file < explicit CLI flags. Torch-free; imports nothing of
minituner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

__all__ = ["check_value", "from_dict", "merge_settings", "typed_values"]

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "a list of strings", dict: "a mapping with string keys"}


def _allowed(annotation) -> tuple:
    """'int | None' -> (int, None)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    return tuple(None if part == "None" else _TYPES[part] for part in parts)


def _from_text(kind: type, text: str):
    """A number field's value written as text, or None when the text is not such a number."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number


def check_value(name: str, value, annotation, source: str):
    """``value`` checked (and numbers written as text converted) for a field annotated
    ``annotation``; a one-line ValueError naming ``source`` and the field otherwise."""
    allowed = _allowed(annotation)
    if value is None and None in allowed:
        return None
    kind = next(t for t in allowed if t is not None)
    if kind in (int, float) and isinstance(value, str):
        converted = _from_text(kind, value)
        value = value if converted is None else converted
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = not isinstance(value, bool) and (
            isinstance(value, int) or (kind is float and isinstance(value, float)))
        value = float(value) if ok and kind is float else value
    elif kind is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        value = dict(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = _NAMES[kind] + (" or null" if None in allowed else "")
        raise ValueError(f"{source}: {name!r} must be {what}, got {value!r}")
    return value


def typed_values(cls, values: dict, source: str) -> dict:
    """``values`` checked against ``cls``'s fields: unknown keys listed with the known ones,
    every value type-checked (numbers written as text converted)."""
    specs = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(specs)}")
    return {name: check_value(name, value, specs[name].type, source)
            for name, value in values.items()}


def from_dict(cls, values: dict, source: str):
    """An instance of the dataclass ``cls`` from ``values`` (see :func:`typed_values`)."""
    return cls(**typed_values(cls, values, source))


def merge_settings(defaults: dict, config_file: dict, flags: dict,
                   exclusive: Iterable[tuple] = ()) -> dict:
    """defaults < config file < explicit flags (``flags`` holds only the flags given).

    ``exclusive`` lists groups of settings of which one level sets at most one (--steps or
    --epochs): a level that sets one of them clears the others of the lower levels.
    """
    merged = dict(defaults)
    for level in (config_file, flags):
        for group in exclusive:
            chosen = [name for name in group if level.get(name) is not None]
            for other in group:
                if chosen and other not in chosen:
                    merged[other] = None
        merged.update(level)
    return merged
