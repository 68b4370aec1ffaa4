"""Language modelling: the loss on the labelled tokens of `.jsonl` records (text, completions,
chat), each position predicting the next token over the whole vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..data.batching import IGNORE_INDEX, collate
from ..loss import PlainHead, TokenStats, backbone, output_head, stream_head
from .base import Batch, Objective, register

MAX_LABELS = 50  # more distinct completions than this are no closed label set


def label_choices(records: list[dict], tok) -> torch.Tensor | None:
    """Token ids of the label set when the completions form a small closed set whose labels
    start with distinct tokens (a classification task); None otherwise."""
    if not records or any("completion" not in r for r in records):
        return None
    labels = sorted({r["completion"] for r in records})
    if len(labels) > MAX_LABELS or len(labels) < 2:
        return None
    firsts = [tok(l, add_special_tokens=False).input_ids[:1] for l in labels]
    ids = [f[0] for f in firsts if f]
    if len(ids) != len(labels) or len(set(ids)) != len(ids):
        return None
    return torch.tensor(ids)


@register("lm")
class LanguageModeling(Objective):
    """Causal-LM cross-entropy on the `labels` positions, streamed over the vocabulary
    (`loss.stream_head`: no (rows, vocab) logits).

    `choices`: token ids of a closed label set (`label_choices`); then each row's first label
    token is also classified among them, and evaluation reports that accuracy."""

    def __init__(self, choices: torch.Tensor | None = None):
        self.choices = choices

    @classmethod
    def takes_item(cls, item: tuple) -> bool:
        return len(item) == 2  # (ids, n_prompt)

    @classmethod
    def takes_task(cls, task) -> bool:
        return task is None

    def collate(self, items: Sequence[tuple], pad_id: int) -> Batch:
        return collate(items, pad_id)

    @staticmethod
    def _label_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel (B, T-1), next-token ids (B, T-1)): position t predicts token t+1, so the
        positions whose next token is a label."""
        targets = batch["labels"][:, 1:]
        return targets != IGNORE_INDEX, targets

    def stats(self, model: nn.Module, batch: Batch, groups: int = 1,
              head_view=None) -> TokenStats:
        labels = batch["labels"]
        hidden = backbone(model, batch)
        sel, targets = self._label_positions(batch)
        B = labels.shape[0]
        rows = torch.arange(B, device=labels.device)[:, None].expand_as(targets)[sel]
        h = hidden[:, :-1][sel]                     # (N, H)
        tgt = targets[sel]                          # (N,)
        head = output_head(model)
        p = stream_head(h, tgt, (head_view or PlainHead(head)).chunks(groups),
                        group_of=rows // (B // groups), groups=groups,
                        softcap=getattr(model.config, "final_logit_softcapping", None))

        def choice_logits(hf):
            (w,), (bc,) = PlainHead(head).rows(self.choices, 1)  # (an int8 head: those rows)
            cl = hf @ w.to(hf.dtype).T
            return cl if bc is None else cl + bc
        return self.row_stats(B, rows, p.nll, p.correct.detach(), h, tgt, choice_logits)

    def row_stats(self, B: int, rows, nll, correct, h, tgt, choice_logits) -> TokenStats:
        """The per-row sums of B rows from their scored positions' `rows` (N,) (in order,
        positions ascending), `nll`, `correct` (argmax = target), hidden states `h` (N, H)
        and targets `tgt`; `choice_logits(h)` scores hidden states against the closed label
        set (each row's first label position is classified among it)."""
        zeros = h.new_zeros((B,), dtype=torch.float32)
        choice_correct = None
        if self.choices is not None and h.shape[0]:
            first = torch.ones_like(rows, dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            pred = self.choices[choice_logits(h[first]).argmax(1)]
            choice_correct = zeros.index_put((rows[first],), (pred == tgt[first]).float())
        return TokenStats(
            nll=zeros.index_add(0, rows, nll),
            tokens=zeros.index_add(0, rows, torch.ones_like(nll)),
            correct=zeros.index_add(0, rows, correct),
            choice_correct=choice_correct,
        )

    def n_scored(self, batch: Batch) -> int:
        return int(self._label_positions(batch)[0].sum())  # label tokens

    @property
    def accuracy(self) -> bool:
        return self.choices is not None

    def exact_match(self, items: Sequence[tuple]) -> bool:
        return any(it[1] > 0 for it in items)  # completions, not free text

    def scored_rows(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return hidden[:, :-1][self._label_positions(batch)[0]]

    def batch_targets(self, batch: Batch) -> tuple[torch.Tensor, None]:
        sel, targets = self._label_positions(batch)
        return targets[sel], None
