"""Multiple choice (COPA): each candidate continuation is scored by its mean per-token
log-likelihood after the prompt, and the right one should score highest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..data.batching import collate
from ..loss import TokenStats
from .base import Batch, Objective, register
from .classification import class_result
from .lm import LanguageModeling


@register("choice")
class MultipleChoice(Objective):
    """Each example's C candidates are consecutive rows of the batch; the loss is the
    cross-entropy of the right one among the candidates' scores. One entry per example."""

    marker = "choice_label"

    def __init__(self):
        self.lm = LanguageModeling()  # scores each candidate row

    @classmethod
    def takes_item(cls, item: tuple) -> bool:
        return len(item) == 3 and "candidates" in item[2]

    @classmethod
    def takes_task(cls, task) -> bool:
        return task is not None and task.multiple_choice

    def collate(self, items: Sequence[tuple], pad_id: int) -> Batch:
        """Items `(ids, n_prompt, meta)` with `meta["candidates"]` (`data.tasks.
        encode_examples`): each example's C candidate rows, consecutive, with per-row
        `choice_label` (1 on the right one) and `n_choices`."""
        metas = [m for _, _, m in items]
        C = len(metas[0]["candidates"])
        if any(len(m["candidates"]) != C for m in metas):
            raise ValueError(f"multiple choice: every example needs the same number of "
                             f"candidates ({C} in the first)")
        batch = collate([c for m in metas for c in m["candidates"]], pad_id)
        batch["choice_label"] = torch.tensor([int(c == m["class_label"])
                                              for m in metas for c in range(C)])
        batch["n_choices"] = torch.full((len(metas) * C,), C, dtype=torch.long)
        return batch

    def stats(self, model: nn.Module, batch: Batch, groups: int = 1,
              head_view=None) -> TokenStats:
        s = self.lm.stats(model, batch, groups, head_view)
        C = self.n_classes(batch)
        score = (-s.row_loss()).view(-1, C)                                            # (E, C)
        return class_result(score, self.gold(batch))

    def n_scored(self, batch: Batch) -> int:
        return int(batch["choice_label"].shape[0] // self.n_classes(batch))  # examples

    def gold(self, batch: Batch) -> torch.Tensor:
        return batch["choice_label"].view(-1, self.n_classes(batch)).argmax(1)

    def n_classes(self, batch: Batch) -> int:
        return int(batch["n_choices"][0])

    # Split mode trains the language-modelling loss on every candidate's tokens (the server
    # sees label positions, not examples).
    def scored_rows(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.lm.scored_rows(hidden, batch)

    def batch_targets(self, batch: Batch) -> tuple[torch.Tensor, None]:
        return self.lm.batch_targets(batch)
