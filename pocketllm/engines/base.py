"""The `Engine` seam: the one object that runs the forward passes of a zeroth-order step.

An engine owns the trainable tensors of a run as the forward passes see them. It evaluates a
`Plan` (replicas of the batch, each through its own perturbation, grouped into forward passes)
and applies seeded updates (p_i += coef * z(keys[i])), possibly deferred into the next step's
perturbation. `TorchEngine` runs eager PyTorch; an engine for another runtime (ExecuTorch, ONNX
Runtime) implements the same few methods, registers itself in `engines/__init__.py`, and is
then checked by the conformance tests in tests/engines/ (losses equal the reference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..registry import Registry
from ..zo.plan import Plan

REGISTRY = Registry("engine")
register = REGISTRY.register

# seeded updates: (keys of every tensor, coefficient) -> p_i += coef * z(keys[i])
Seeded = list[tuple[Sequence[int], float]]


class Engine(ABC):
    """Forward passes over `model` whose trainable tensors are `params`, scored by `stats`
    (an objective's `stats(model, batch, groups, head_view) -> TokenStats`), with
    perturbations of distribution `dist` (see `pocketllm.zo.noise`) drawn as `perturbation`
    says (`pocketllm.zo.perturbations`; None: dense). An engine that cannot build a
    perturbation refuses it in its constructor (a ValueError naming it)."""

    name = "?"

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], stats,
                 dist: str = "gaussian", perturbation=None):
        self.model, self.params, self.stats, self.dist = model, params, stats, dist
        self.perturbation = perturbation

    @abstractmethod
    def losses(self, batch: dict[str, torch.Tensor], plan: Plan) -> torch.Tensor:
        """The mean loss of every replica of `plan` on `batch`: (len(plan.replicas),) float64."""

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The loss at the current weights (pending updates applied)."""

    @abstractmethod
    def apply(self, updates: Seeded) -> None:
        """Queue seeded updates, applied in order before the weights are next read."""

    @abstractmethod
    def sync(self) -> None:
        """Apply every queued update now (before evaluation, saving, or the end)."""
