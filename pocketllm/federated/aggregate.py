"""How the server combines the devices' projected gradients of one query (`--aggregate`).

Each round every included device sends one scalar per query; the coefficient of query j is
a function of the j-th scalars alone. `mean` is FedKSeed's; `median` and `trimmed` (the mean
of what is left after dropping the `--trim` fraction at each end) tolerate a minority of
outliers that passed validation (finite and within `--grad-bound`, yet wrong).

A new rule is a function `(values, trim) -> float` here with `@register("name")`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

REGISTRY: dict[str, Callable[[Sequence[float], float], float]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


@register("mean")
def mean(values: Sequence[float], trim: float = 0.0) -> float:
    return math.fsum(values) / len(values)


@register("median")
def median(values: Sequence[float], trim: float = 0.0) -> float:
    return float(statistics.median(values))


@register("trimmed")
def trimmed(values: Sequence[float], trim: float = 0.1) -> float:
    """The mean of the values left after dropping floor(trim * n) at each end (at least one
    value is always kept)."""
    v = sorted(values)
    k = min(int(trim * len(v)), (len(v) - 1) // 2)
    return mean(v[k:len(v) - k])


def aggregate(rule: str, per_device: Sequence[Sequence[float]], trim: float = 0.1) -> list[float]:
    """Per query, the rule applied over the devices' scalars (`per_device[d][j]`)."""
    if rule not in REGISTRY:
        raise ValueError(f"unknown aggregate {rule!r}; available: {', '.join(sorted(REGISTRY))}")
    fn = REGISTRY[rule]
    return [fn(col, trim) for col in zip(*per_device)]
