"""Training objectives, by name. One file per objective; importing it registers it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import REGISTRY, Batch, Objective, register
from . import choice, classification, lm  # noqa: F401  (registration)
from .choice import MultipleChoice
from .classification import Classification
from .lm import LanguageModeling, label_choices

__all__ = ["REGISTRY", "Classification", "LanguageModeling", "MultipleChoice", "Objective",
           "choose", "for_batch", "label_choices", "register"]


def _one(kinds: list[type[Objective]], what: str) -> type[Objective]:
    if len(kinds) != 1:
        names = ", ".join(k.name for k in kinds) or "none"
        raise ValueError(f"{what}: {len(kinds)} objectives take it ({names}); exactly one must "
                         f"(registered: {', '.join(REGISTRY)})")
    return kinds[0]


def _make(cls: type[Objective], choices: torch.Tensor | None) -> Objective:
    if choices is None:
        return cls()
    if not issubclass(cls, LanguageModeling):
        raise ValueError(f"a closed label set (choices) is for language modelling, not {cls.name}")
    return cls(choices=choices)


def choose(items: Sequence[tuple] = (), task=None, choices: torch.Tensor | None = None
           ) -> Objective:
    """The objective of a run's data, from its encoded items (the first one decides) or, with
    none, from its task (`data.tasks.Task`; None: .jsonl records).

    `choices`: a records run's closed label set (`label_choices`), for language modelling."""
    if len(items):
        cls = _one([c for c in REGISTRY.values() if c.takes_item(items[0])],
                   f"encoded item of {len(items[0])} fields"
                   + (f" with {sorted(items[0][2])}" if len(items[0]) == 3 else ""))
        if task is not None and not cls.takes_task(task):
            raise ValueError(f"task {task.name}: its items are {cls.name} items")
    else:
        cls = _one([c for c in REGISTRY.values() if c.takes_task(task)],
                   f"task {task.name}" if task is not None else ".jsonl records")
    return _make(cls, choices)


def for_batch(batch: Batch, choices: torch.Tensor | None = None) -> Objective:
    """The objective whose collate made `batch`, told by the key only it writes
    (`Objective.marker`). For entry points that get a bare batch (`loss.token_stats`,
    `loss.n_scored`, `split.client.device_step`); code that knows its data uses `choose`."""
    marked = [c for c in REGISTRY.values() if c.marker is not None and c.marker in batch]
    cls = _one(marked or [c for c in REGISTRY.values() if c.marker is None],
               f"batch with keys {sorted(batch)}")
    return _make(cls, choices)
