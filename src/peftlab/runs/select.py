"""The one selection rule, for sweep summaries and reports alike: the best configuration is the one
with the highest mean VALIDATION metric (test figures are reported, never used to choose); ties go to
the lower validation loss, then to fewer trainable parameters, then to the earlier name.

The loss breaks ties because a small validation set makes the metric coarse (16 rows: steps of 1/16),
so that many candidates tie on it; the loss is continuous and says which of them is the more confident
where it is right. Trainer.end_epoch picks a run's best epoch by the same rule (`better`)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

RULE = "highest validation metric; ties: lower validation loss"


def better(metric: float, loss: float | None, best_metric: float, best_loss: float | None) -> bool:
    """Is (metric, loss) better than the best so far by the rule above? A missing loss never wins a tie."""
    if metric != best_metric:
        return metric > best_metric
    return loss is not None and math.isfinite(loss) and (best_loss is None or loss < best_loss)


def pick_best(candidates: Iterable[T], validation: Callable[[T], float | None],
              trainable: Callable[[T], int | None], name: Callable[[T], str],
              loss: Callable[[T], float | None] = lambda c: None) -> T | None:
    """The best candidate, or None when there is none. A missing validation figure ranks last, and a
    missing loss last among its ties."""
    def key(c: T) -> tuple:
        v, lo = validation(c), loss(c)
        return (-(v if v is not None else float("-inf")), lo if lo is not None else float("inf"),
                trainable(c) or 0, name(c))

    ranked = sorted(candidates, key=key)
    return ranked[0] if ranked else None
