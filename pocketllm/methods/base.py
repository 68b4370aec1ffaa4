"""The interface every training method implements, and the registry that names them.

A method owns the trainable tensors and whatever state updating them needs; the loop in
`pocketllm.train` owns data, schedule, evaluation and output. Adding a method is one new file
with a `@register("name")` class and one import line in `methods/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..loss import token_stats
from ..registry import Registry

REGISTRY = Registry("method")
register = REGISTRY.register


def get_method(name: str) -> type["Method"]:
    """The method class registered as `name`."""
    return REGISTRY.lookup(name)


def fill_defaults(args, cls: type["Method"]) -> None:
    """Replace settings left at 0 (learning_rate, eps) by the method's default for the
    trainable set, so a run works without a grid search. A default may differ by objective:
    "lora:task" (prompt-based classification) before "lora" (any)."""
    objective = "task" if getattr(args, "task", "") else "lm"
    merged = {**cls.defaults.get(args.trainable, {}),
              **cls.defaults.get(f"{args.trainable}:{objective}", {})}
    for key, value in merged.items():
        if not getattr(args, key, None) or getattr(args, key) == "auto":
            setattr(args, key, value)
    if getattr(args, "lr_schedule", None) == "auto":
        args.lr_schedule = "constant"
    if not args.learning_rate:
        raise SystemExit(f"--method {cls.name} has no default learning rate for "
                         f"--trainable {args.trainable}: give --learning-rate")


@dataclass
class StepResult:
    loss: float                 # training loss of the step's batch(es)
    tokens: int                 # label tokens processed (each forward counted once)
    forward_passes: int         # forward passes over a micro-batch (a pair forward counts 2)
    extra: dict = field(default_factory=dict)  # method-specific figures for the log


class Method(ABC):
    """Trains `params` of `model`. `loss_fn(model, batch) -> scalar loss` for first-order
    methods; zeroth-order ones call the loss machinery themselves with their perturbations."""

    name = "?"
    trainable_kinds: tuple[str, ...] = ("full", "lora")
    # Settings used when the run leaves them at 0, per trainable set; each method documents
    # where its figures come from.
    defaults: dict[str, dict[str, float]] = {}
    # What scores a batch: stats(model, batch, groups=1, head_view=None) -> TokenStats.
    # An instance may be given another scorer with the same signature (the benchmark
    # workload's masked-LM loss does).
    stats = staticmethod(token_stats)

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], args):
        fill_defaults(args, type(self))
        self.model, self.params, self.args = model, params, args

    @abstractmethod
    def step(self, batches: list[dict[str, torch.Tensor]], step: int, lr: float) -> StepResult:
        """One optimisation step over the micro-batches of `step`."""

    def sync(self) -> None:
        """Bring the model's weights up to date (methods may defer work); called before
        evaluation and saving."""

    def open_log(self, out_dir: Path, fresh: bool) -> None:
        """Start (or, resuming, continue) the method's own per-step log in `out_dir`."""

    def save_state(self, out_dir: Path, step: int) -> None:
        """Persist what is needed to resume after `step` (besides the trained weights)."""

    def restore(self, out_dir: Path) -> int:
        """Restore from `out_dir`; return the number of completed steps."""
        return 0
