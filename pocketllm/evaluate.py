"""Held-out evaluation: loss, perplexity, and accuracy where the task has one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import eval_batches
from .loss import token_stats

MAX_LABELS = 50


@dataclass
class EvalResult:
    loss: float
    ppl: float
    accuracy: float | None        # closed label set: the right label ranks first among them
    exact_match: float | None     # the whole completion is the greedy (teacher-forced) output
    token_accuracy: float
    tokens: int
    records: int

    def line(self) -> str:
        parts = [f"loss {self.loss:.4f}", f"ppl {self.ppl:.2f}"]
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.1%}")
        if self.exact_match is not None:
            parts.append(f"exact_match {self.exact_match:.1%}")
        parts.append(f"token_accuracy {self.token_accuracy:.1%}")
        return " | ".join(parts)


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


@torch.no_grad()
def evaluate(model, items, batch_size: int, pad_id: int, max_batches: int = -1,
             choices: torch.Tensor | None = None) -> EvalResult:
    """Loss, perplexity and accuracies over encoded (ids, n_prompt) items."""
    nll = tok = correct = exact = recs = chosen = 0.0
    for i, b in enumerate(eval_batches(items, batch_size, pad_id)):
        if 0 <= max_batches <= i:
            break
        s = token_stats(model, b, choices=choices)
        nll += float(s.nll.sum())
        tok += float(s.tokens.sum())
        correct += float(s.correct.sum())
        exact += float(((s.correct == s.tokens) & (s.tokens > 0)).sum())
        if s.choice_correct is not None:
            chosen += float(s.choice_correct.sum())
        recs += len(s.tokens)
    loss = nll / max(tok, 1)
    has_prompt = any(n > 0 for _, n in items)  # completions, not free text
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50)),
                      accuracy=chosen / max(recs, 1) if choices is not None else None,
                      exact_match=exact / max(recs, 1) if has_prompt else None,
                      token_accuracy=correct / max(tok, 1), tokens=int(tok), records=int(recs))
