"""The `Estimator` seam: which perturbed losses a zeroth-order step needs, and how they become
a gradient estimate.

An estimate is held as seeds: per query j its keys and a projected gradient g_j, so that

    g_hat = (1/q) sum_j g_j z(keys[j])        (z regenerated from the key, never stored)

An estimator (1) lists the replicas it needs evaluated for q queries (`replicas`) and (2) turns
their losses into the q projected gradients (`projected`). Which engine computes the losses and
how the replicas are grouped into forward passes is not its concern. A new estimator is one file
in this folder with a `@register("name")` class and one import line in `__init__.py`; the
conformance tests in tests/zo/test_estimators.py then check it on a quadratic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ...registry import Registry
from ..plan import Replica

REGISTRY = Registry("estimator")
register = REGISTRY.register


class Estimator(ABC):
    """Plans the replicas of q queries and combines their losses."""

    name = "?"
    # The fewest queries the estimate is defined for (fzoo's loss spread needs two).
    min_queries = 1
    # False: g_hat estimates the gradient itself (its mean on a quadratic is the gradient).
    # True: g_hat estimates the gradient's direction at a fixed scale (normalised SGD: the
    # step is lr whatever the loss's scale), and the projected gradients do not change when
    # the losses are scaled or shifted. tests/zo/test_estimators.py checks what each promises.
    normalised = False
    # Per-query figures besides the projected gradients that `report` returns and the step
    # logs (hizoo: "curvature"); a perturbation that keeps state needs some of them
    # (`Perturbation.needs`) and rebuilds its state from the log's on replay.
    reports: tuple[str, ...] = ()

    def __init__(self, queries: int = 1):
        if queries < self.min_queries:
            raise ValueError(f"--estimator {self.name} needs at least {self.min_queries} "
                             f"queries a step (--queries, a prge setting), got {queries}")
        self.queries = queries

    @abstractmethod
    def replicas(self) -> list[Replica]:
        """The replicas whose losses `projected` needs, in the order it reads them."""

    @abstractmethod
    def projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        """The q projected gradients from the replicas' losses (float64, one per replica)."""

    def report(self, losses: torch.Tensor, eps: float) -> dict[str, list[float]]:
        """The figures named by `reports`, one per query, from the replicas' losses."""
        return {}

    def spec(self) -> dict:
        """What a log header records to rebuild this estimator."""
        return {"name": self.name, "queries": self.queries}
