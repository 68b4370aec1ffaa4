"""The `Estimator` seam: which perturbed losses a zeroth-order step needs, and how they become
a gradient estimate.

An estimate is held as seeds: per query j its keys and a projected gradient g_j, so that

    g_hat = (1/q) sum_j g_j z(keys[j])        (z regenerated from the key, never stored)

An estimator (1) lists the replicas it needs evaluated for q queries (`replicas`) and (2) turns
their losses into the q projected gradients (`projected`). Which engine computes the losses and
how the replicas are grouped into forward passes is not its concern.

An *anchored* estimator (svrg: `anchor_every` > 0) also evaluates replicas at an anchor
(`Replica.anchor`): the weights as they were at its last refresh. Every `anchor_every` steps
(from step 0) a refresh step evaluates `refresh_replicas` over the whole training set at the
current weights, which become the anchor, and its projected gradients (`refresh_projected`)
become the anchor's estimate a_j, added to every step's until the next refresh:

    g_hat = (1/q) [sum_j g_j z(keys_t[j]) + sum_j a_j z(keys_a[j])]     (a: the refresh step)

The method keeps the anchor (the engine's copy of the trainable tensors) and logs a_j with each
step, so the estimator itself stays a pure function of the losses.

Settings of an estimator's own are constructor keywords, filled from the run's settings named
in `flags` (as the ZO optimizers'; `build`). A new estimator is one file
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
    # steps between refreshes of the anchor (see above); 0: no anchor
    anchor_every = 0
    anchor_lr = 1.0  # a refresh step's learning rate, as a multiple of the step's
    flags: dict[str, str] = {}  # constructor keyword -> the run setting it comes from
    # the state it keeps, for `pocketllm memory`: (what, copies, of what), as
    # `ZOOptimizer.memory` declares it
    memory: tuple[tuple[str, int, str], ...] = ()

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

    def traced(self, losses: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`projected` in tensor ops alone (float64 losses and eps in, (q,) float64 out, no
        Python branch on a value), so an exported program can compute it
        (`pocketllm.selftrain`: the step as one program); None where an estimator has none."""
        raise NotImplementedError(f"--estimator {self.name} has no traced form")

    def refreshes(self, step: int) -> bool:
        """Whether `step` refreshes the anchor (an anchored estimator's steps 0, m, 2m, ...)."""
        return self.anchor_every > 0 and step % self.anchor_every == 0

    def refresh_replicas(self) -> list[Replica]:
        """An anchored estimator's replicas of a refresh step (at the current weights)."""
        raise NotImplementedError(f"--estimator {self.name} has no anchor")

    def refresh_projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        """The anchor's q projected gradients from the refresh replicas' losses."""
        raise NotImplementedError(f"--estimator {self.name} has no anchor")

    def settings(self) -> dict:
        """Its own settings (`flags`), as a log header records them."""
        return {h: getattr(self, h) for h in self.flags}

    def report(self, losses: torch.Tensor, eps: float) -> dict[str, list[float]]:
        """The figures named by `reports`, one per query, from the replicas' losses."""
        return {}

    def spec(self) -> dict:
        """What a log header records to rebuild this estimator."""
        return {"name": self.name, "queries": self.queries, **self.settings()}


def build(cfg, queries: int) -> Estimator:
    """The estimator `cfg.estimator` names for `queries` queries, its own settings read from
    `cfg` (its `flags`); a ValueError naming the flag if they cannot work."""
    cls = REGISTRY.lookup(cfg.estimator)
    return cls(queries, **{h: getattr(cfg, f) for h, f in cls.flags.items()})
