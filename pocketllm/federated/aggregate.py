"""How the server turns the included devices' replies into a round's coefficients
(`--aggregate`).

Two kinds of rule, by what a device sends (`Rule.sends`):

  "losses"  pooled (the default): each device sends its replicas' losses (for prge/fzoo the
            unperturbed loss and the q perturbed ones, each the token-weighted mean over its
            rows) and how many tokens they average over; the server takes each replica's
            token-weighted mean over the devices -- the losses of the union of their batches
            -- and applies the run's estimator to them once. With every device included this is
            exactly the step pooled training on the union of their batches takes (same seeds,
            same rows, up to float rounding). Per-device estimates are not: fzoo divides each
            device's differences by the spread of ITS OWN losses (2 rows), and the mean of
            ratios is not the ratio of the pooled losses. Not outlier-tolerant: one device's
            losses move the pooled ones (within --grad-bound).
  "grads"   each device applies the estimator to its own losses and sends its q projected
            gradients; the coefficient of query j is a function of the j-th scalars alone.
            `mean` is FedKSeed's; `median` and `trimmed` (the mean of what is left after
            dropping the `--trim` fraction at each end) tolerate a minority of outliers that
            passed validation (finite and within `--grad-bound`, yet wrong).

A new per-query rule is a function `(values, trim) -> float` here with `@register("name")`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (the pooled replicas' losses) -> the q projected gradients: the run's estimator (server.py)
Estimate = Callable[[list[float]], list[float]]


@dataclass(frozen=True)
class Rule:
    sends: str  # what each device's reply carries: "grads" or "losses"
    combine: Callable[[Sequence[dict], float, Estimate | None], list[float]]


REGISTRY: dict[str, Rule] = {}
PER_QUERY: dict[str, Callable[[Sequence[float], float], float]] = {}


def register(name: str):
    """A per-query rule over the devices' projected gradients."""
    def deco(fn):
        PER_QUERY[name] = fn
        REGISTRY[name] = Rule("grads", lambda replies, trim, estimate: aggregate(
            name, [r["grads"] for r in replies], trim))
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


def pooled_losses(losses: Sequence[Sequence[float]], tokens: Sequence[int]) -> list[float]:
    """Per replica, the token-weighted mean of the devices' losses (`losses[d][i]`, device d
    averaging over `tokens[d]` tokens): the loss over the union of their batches."""
    total = sum(tokens)
    return [math.fsum(t * x for t, x in zip(tokens, col)) / total for col in zip(*losses)]


def _pooled(replies: Sequence[dict], trim: float, estimate: Estimate | None) -> list[float]:
    if estimate is None:
        raise ValueError("--aggregate pooled needs the run's estimator")
    return estimate(pooled_losses([r["losses"] for r in replies],
                                  [r["tokens"] for r in replies]))


REGISTRY["pooled"] = Rule("losses", _pooled)


def aggregate(rule: str, per_device: Sequence[Sequence[float]], trim: float = 0.1) -> list[float]:
    """Per query, a per-query rule applied over the devices' scalars (`per_device[d][j]`)."""
    if rule not in PER_QUERY:
        raise ValueError(f"unknown per-query aggregate {rule!r}; available: "
                         f"{', '.join(sorted(PER_QUERY))}")
    fn = PER_QUERY[rule]
    return [fn(col, trim) for col in zip(*per_device)]


def combine(rule: str, replies: Sequence[dict], trim: float = 0.1,
            estimate: Estimate | None = None) -> list[float]:
    """The round's coefficients from the included replies under `rule`."""
    if rule not in REGISTRY:
        raise ValueError(f"unknown aggregate {rule!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[rule].combine(replies, trim, estimate)
