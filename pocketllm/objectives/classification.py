"""Prompt-based classification (MeZO / LM-BFF): a template ends where the answer goes, and the
class is the label word whose head row scores highest at that one position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..data.batching import collate
from ..loss import PlainHead, TokenStats, answer_transform, backbone, output_head
from .base import Batch, Objective, register


def class_result(logits: torch.Tensor, y: torch.Tensor) -> TokenStats:
    """One entry per example from its (E, C) class scores and right class `y` (E,): the
    cross-entropy, and the prediction (accuracy counts it)."""
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    pred = logits.argmax(1)
    right = (pred == y).float()
    return TokenStats(nll=nll, tokens=torch.ones_like(nll), correct=right.detach(),
                      choice_correct=right.detach(), pred=pred)


@register("classification")
class Classification(Objective):
    """Cross-entropy over the label words at the answer position (the last prompt token of a
    causal LM, the mask of a masked LM): only those head rows are read, so (B, C) logits
    instead of (B, T, vocab). One entry per row."""

    marker = "class_label"

    @classmethod
    def takes_item(cls, item: tuple) -> bool:
        return len(item) == 3 and "label_ids" in item[2]

    @classmethod
    def takes_task(cls, task) -> bool:
        return task is not None and not task.multiple_choice

    def collate(self, items: Sequence[tuple], pad_id: int) -> Batch:
        """Items `(ids, n_prompt, meta)` (`data.tasks.encode_examples`): the padded rows plus
        per-row `class_label` (B,), `answer_pos` (B,) and `label_ids` (B, C)."""
        metas = [m for _, _, m in items]
        batch = collate([(ids, n) for ids, n, _ in items], pad_id)
        batch["class_label"] = torch.tensor([m["class_label"] for m in metas])
        batch["answer_pos"] = torch.tensor([m["answer_pos"] for m in metas])
        batch["label_ids"] = torch.tensor([m["label_ids"] for m in metas])
        return batch

    def stats(self, model: nn.Module, batch: Batch, groups: int = 1,
              head_view=None) -> TokenStats:
        hidden = backbone(model, batch)
        h = answer_transform(model)(self.scored_rows(hidden, batch))               # (B, H)
        uniq, inv = torch.unique(batch["label_ids"], return_inverse=True)           # inv: (B, C)
        ws, bs = (head_view or PlainHead(output_head(model))).rows(uniq, groups)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        parts = []
        for g, hg in enumerate(h.chunk(groups, 0)):
            lg = hg @ ws[g].to(hg.dtype).T
            if bs[g] is not None:
                lg = lg + bs[g]
            parts.append(lg.float())
        logits = torch.cat(parts).gather(1, inv)                                       # (B, C)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return class_result(logits, batch["class_label"])

    def n_scored(self, batch: Batch) -> int:
        return int(batch["class_label"].shape[0])  # rows

    def gold(self, batch: Batch) -> torch.Tensor:
        return batch["class_label"]

    def n_classes(self, batch: Batch) -> int:
        return int(batch["label_ids"].shape[1])

    def scored_rows(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0]), batch["answer_pos"]]

    def batch_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["class_label"], batch["label_ids"]
