"""The interface every training objective implements, and the registry that names them.

An objective is what a run's data asks the model to do: continue text (language modelling),
pick a label word at one position (prompt-based classification), rank candidate continuations
(multiple choice). It owns everything that depends on that: how encoded items become a batch,
how a batch is scored, what the loss is averaged over, what evaluation reports, and which
hidden states and targets split mode sends. The rest of the code holds one objective, chosen
once from the data (`objectives.choose`), and never looks at a batch's keys to guess it.

Adding an objective is one new file with a `@register("name")` class and one import line in
`objectives/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from ..loss import TokenStats
from ..registry import Registry

REGISTRY = Registry("objective")
register = REGISTRY.register

Batch = dict[str, torch.Tensor]


class Objective(ABC):
    """How one kind of data is batched, scored and evaluated.

    Every tensor a `collate` returns is per row (dim 0), so a batch repeated G times along dim
    0 and scored with `groups=G` gives each group the loss of the original batch: that is how
    zeroth-order methods score several perturbations in one forward."""

    name: ClassVar[str] = "?"     # set by `register`
    # The batch key only this objective's collate writes (None: the objective of a batch with
    # no other's key). Only `objectives.for_batch` reads it, for callers holding a bare batch.
    marker: ClassVar[str | None] = None

    # ---- which data it is for -----------------------------------------------------------
    @classmethod
    @abstractmethod
    def takes_item(cls, item: tuple) -> bool:
        """Whether an encoded item (as `RunData.encode` makes them) is this objective's."""

    @classmethod
    @abstractmethod
    def takes_task(cls, task) -> bool:
        """Whether a run's `data.tasks.Task` (None: .jsonl records) is this objective's."""

    # ---- batching and scoring -------------------------------------------------------------
    @abstractmethod
    def collate(self, items: Sequence[tuple], pad_id: int) -> Batch:
        """A padded batch of encoded items; every tensor per row."""

    @abstractmethod
    def stats(self, model: nn.Module, batch: Batch, groups: int = 1,
              head_view=None) -> TokenStats:
        """Per-entry sums of the batch's loss; rows split into `groups` equal groups, each
        reading the output head through `head_view` (`loss.PlainHead` by default)."""

    @abstractmethod
    def n_scored(self, batch: Batch) -> int:
        """What the batch's loss is averaged over: `stats(...).tokens.sum()` without running
        the model."""

    # ---- evaluation -------------------------------------------------------------------------
    @property
    def accuracy(self) -> bool:
        """Whether evaluation reports accuracy (`stats(...).choice_correct` is filled)."""
        return True

    def gold(self, batch: Batch) -> torch.Tensor | None:
        """The right class of each entry of `stats(batch).pred` (for macro-F1); None when the
        objective predicts no class."""
        return None

    def n_classes(self, batch: Batch) -> int | None:
        """How many classes `gold` ranges over."""
        return None

    def exact_match(self, items: Sequence[tuple]) -> bool:
        """Whether exact match (the whole target is the greedy output) applies to `items`."""
        return False

    # ---- split mode ---------------------------------------------------------------------------
    @abstractmethod
    def scored_rows(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The (N, H) hidden states the head loss is computed from (what the device sends)."""

    @abstractmethod
    def batch_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(targets (N,), candidates (N, C) or None), one per `scored_rows` row: token ids over
        the whole vocabulary, or indices into each row's candidate token ids."""
