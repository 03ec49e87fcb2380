"""Names the config accepts for a field whose owner lives above config (method.name: the methods in
models/methods/). The owner registers a function that lists its names when it is imported, so config
validates them without importing upward; the package root (peftlab/__init__) imports every owner."""
from __future__ import annotations

from collections.abc import Callable

_CHOICES: dict[str, Callable[[], list[str]]] = {}


def register_choices(field: str, names: Callable[[], list[str]]) -> None:
    """`field` (dotted, e.g. "method.name") accepts what `names()` lists."""
    _CHOICES[field] = names


def choices(field: str) -> list[str] | None:
    """The names `field` accepts, or None while no owner has registered them."""
    names = _CHOICES.get(field)
    return None if names is None else list(names())
