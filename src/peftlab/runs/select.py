"""The one selection rule, for sweep summaries and reports alike: the best configuration is the one
with the highest mean VALIDATION metric (test figures are reported, never used to choose); ties go to
fewer trainable parameters, then to the earlier name."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def pick_best(candidates: Iterable[T], validation: Callable[[T], float | None],
              trainable: Callable[[T], int | None], name: Callable[[T], str]) -> T | None:
    """The best candidate, or None when there is none. A missing validation figure ranks last."""
    def key(c: T) -> tuple:
        v = validation(c)
        return (-(v if v is not None else float("-inf")), trainable(c) or 0, name(c))

    ranked = sorted(candidates, key=key)
    return ranked[0] if ranked else None
