"""Held-out evaluation: loss, perplexity, and accuracy where the task has one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import threads
from .data import eval_batches
from .objectives import Objective, choose


@dataclass
class EvalResult:
    loss: float
    ppl: float
    accuracy: float | None        # closed label set: the right label ranks first among them
    exact_match: float | None     # the whole completion is the greedy (teacher-forced) output
    token_accuracy: float
    tokens: int
    records: int
    macro_f1: float | None = None  # classification tasks: mean F1 over the classes

    def line(self) -> str:
        parts = [f"loss {self.loss:.4f}"]
        if self.macro_f1 is None:
            parts.append(f"ppl {self.ppl:.2f}")
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.1%}")
        if self.macro_f1 is not None:
            parts.append(f"macro_f1 {self.macro_f1:.1%}")
        if self.exact_match is not None:
            parts.append(f"exact_match {self.exact_match:.1%}")
        if self.macro_f1 is None:
            parts.append(f"token_accuracy {self.token_accuracy:.1%}")
        return " | ".join(parts)

    def metrics(self) -> dict:
        """The figures for a metrics log (None where they do not apply)."""
        return {"loss": self.loss, "ppl": self.ppl, "accuracy": self.accuracy,
                "macro_f1": self.macro_f1, "exact_match": self.exact_match,
                "token_accuracy": self.token_accuracy}


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_classes: int) -> float:
    """Mean over classes of F1 (a class never predicted nor present counts as 0 only if it
    is present: classes absent from both are left out, as scikit-learn's labels= default)."""
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


@torch.no_grad()
def evaluate(model, items, batch_size: int, pad_id: int, max_batches: int = -1,
             choices: torch.Tensor | None = None, objective: Objective | None = None,
             stats=None) -> EvalResult:
    """Loss, perplexity and the accuracies `objective` reports, over encoded items.

    `objective` batches and scores them (default: `objectives.choose(items, choices=choices)`,
    `choices` being a records run's closed label set); `stats(batch)`, where given, scores
    a batch in place of `objective.stats(model, batch)` (an engine's program)."""
    if objective is None:
        objective = choose(items, choices=choices)
    nll = tok = correct = exact = recs = chosen = 0.0
    preds, golds, n_classes = [], [], None
    # Similar lengths batched together: far less padding (SST-2 dev: 3 to 60 tokens). The
    # figures are sums over records, so the order does not change them.
    items = sorted(items, key=lambda it: len(it[0]), reverse=True)
    for i, b in enumerate(eval_batches(items, batch_size, pad_id, objective.collate)):
        if 0 <= max_batches <= i:
            break
        threads.retune()  # other jobs come and go during a long evaluation (threads.py)
        s = stats(b) if stats is not None else objective.stats(model, b)
        gold = objective.gold(b)
        if gold is not None:
            preds.append(s.pred)
            golds.append(gold)
            n_classes = objective.n_classes(b)
        nll += float(s.nll.sum())
        tok += float(s.tokens.sum())
        correct += float(s.correct.sum())
        exact += float(((s.correct == s.tokens) & (s.tokens > 0)).sum())
        if s.choice_correct is not None:
            chosen += float(s.choice_correct.sum())
        recs += len(s.tokens)
    loss = nll / max(tok, 1)
    f1 = macro_f1(torch.cat(preds), torch.cat(golds), n_classes) if preds else None
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50)),
                      accuracy=chosen / max(recs, 1) if objective.accuracy else None,
                      exact_match=exact / max(recs, 1) if objective.exact_match(items) else None,
                      token_accuracy=correct / max(tok, 1), tokens=int(tok), records=int(recs),
                      macro_f1=f1)
