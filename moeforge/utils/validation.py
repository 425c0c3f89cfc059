"""Type checks for dataclass configs, run first in ``__post_init__``.

Python does not enforce annotations, so ``MoEConfig(glu="no")`` would silently mean True and
``capacity_factor="1.25"`` would fail later inside a comparison or a torch call with a message
that names no field. :func:`check_field_types` refuses such values at construction, naming the
field, the value and the type it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from ..errors import MoeforgeError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping", tuple: "a tuple"}


def _accepts(tp: Any, value: Any) -> bool | None:
    """Whether ``value`` fits annotation ``tp``; None when the annotation is not one we check."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in typing.get_args(tp)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if tp is type(None):
        return value is None
    base = origin or tp
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (str, list, dict, tuple):
        return isinstance(value, base)
    return None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        none = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(parts) + none
    return _NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(obj: Any, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Raise :class:`MoeforgeError` for the first field of dataclass ``obj`` whose value does not
    fit its annotation (bool, int, float, str, list, dict and unions of them; other annotations
    are left to the class's own checks). ``skip`` names fields the class parses itself."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if _accepts(hints[f.name], value) is False:
            raise MoeforgeError(f"{prefix}{f.name} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__}).")
