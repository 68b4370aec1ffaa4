"""The `Engine` seam: the one object that runs the forward passes of a zeroth-order step.

An engine owns the trainable tensors of a run as the forward passes see them. It evaluates a
`Plan` (replicas of the batch, each through its own perturbation, grouped into forward passes)
and applies seeded updates (p_i += coef * z(keys[i])), possibly deferred into the next step's
perturbation. For an anchored estimator (svrg) it also keeps an anchor, a copy of the trainable
tensors taken by `keep_anchor`, and evaluates the plan's anchor replicas there (`at_anchor`).
`TorchEngine` runs eager PyTorch; an engine for another runtime (ExecuTorch, ONNX
Runtime) implements the same few methods, registers itself in `engines/__init__.py`, and is
then checked by the conformance tests in tests/engines/ (losses equal the reference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
    settings: tuple[str, ...] = ()  # ZOConfig fields passed to the constructor by name
    # what it runs (None: anything): model types, --trainable kinds, objectives; it refuses
    # the rest in its constructor, and the conformance tests check it on all it declares
    architectures: tuple[str, ...] | None = None
    trainables: tuple[str, ...] | None = None
    objectives: tuple[str, ...] | None = None
    # --quantize-base: None, the engine runs the torch model as loaded (quantized at load);
    # a tuple, the schemes it builds into programs of its own from the float model (given
    # to its constructor as `quantize`); it refuses the others
    schemes: tuple[str, ...] | None = None

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], stats,
                 dist: str = "gaussian", perturbation=None):
        self.model, self.params, self.stats, self.dist = model, params, stats, dist
        self.anchor: list[torch.Tensor] | None = None
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

    @classmethod
    def load_scheme(cls, scheme: str) -> str:
        """The `--quantize-base` scheme the torch model is loaded in when this engine runs
        `scheme`: the scheme itself, or none where the engine quantizes its own programs."""
        if cls.schemes is None or scheme == "none":
            return scheme
        if scheme not in cls.schemes:
            built = " or ".join(cls.schemes) if cls.schemes else "no quantized base"
            raise ValueError(f"--engine {cls.name} builds {built} into its programs, not "
                             f"--quantize-base {scheme}: use --engine torch for it")
        return "none"

    def scorer(self, repeated: bool = False):
        """What evaluation scores a batch with at the current weights, `(batch) ->
        TokenStats`, when not the objective's `stats` on the torch model (None).
        `repeated`: the split is scored again and again (valid, during training), so what the
        engine computes of it may be kept."""
        return None

    def release_model(self) -> None:
        """Let the engine drop the torch model's frozen weights once its programs hold them
        (evaluation then goes through `scorer`); the trainable tensors stay. Default: kept."""

    def keep_anchor(self) -> None:
        """Keep the trainable tensors as they are now (queued updates applied) as the anchor:
        replicas with `anchor=True` are evaluated there until the next call. A copy of the
        trainable tensors (a LoRA adapter: a few MB)."""
        self.sync()
        with torch.no_grad():
            self.anchor = [p.detach().clone() for _, p in self.params]

    @contextmanager
    def at_anchor(self) -> Iterator[None]:
        """Within the block the trainable tensors hold the anchor's values (the queued updates,
        which belong to the current ones, applied first); restored after it, bit for bit."""
        if self.anchor is None:
            raise RuntimeError("a replica at the anchor before any anchor was kept "
                               "(Engine.keep_anchor)")
        self.sync()
        current = [p.data for _, p in self.params]
        for (_, p), a in zip(self.params, self.anchor):
            p.data = a  # swapped, not copied: the anchor's storage serves the forward
        try:
            yield
        finally:
            for (_, p), c in zip(self.params, current):
                p.data = c
