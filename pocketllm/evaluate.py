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
    preds, golds = [], []
    is_task = bool(items) and len(items[0]) == 3  # task items carry (class, answer position)
    # Similar lengths batched together: far less padding (SST-2 dev: 3 to 60 tokens). The
    # figures are sums over records, so the order does not change them.
    items = sorted(items, key=lambda it: len(it[0]), reverse=True)
    for i, b in enumerate(eval_batches(items, batch_size, pad_id)):
        if 0 <= max_batches <= i:
            break
        s = token_stats(model, b, choices=choices)
        if s.pred is not None:
            preds.append(s.pred)
            golds.append(b["class_label"] if "class_label" in b else
                         b["choice_label"].view(len(s.pred), -1).argmax(1))
        nll += float(s.nll.sum())
        tok += float(s.tokens.sum())
        correct += float(s.correct.sum())
        exact += float(((s.correct == s.tokens) & (s.tokens > 0)).sum())
        if s.choice_correct is not None:
            chosen += float(s.choice_correct.sum())
        recs += len(s.tokens)
    loss = nll / max(tok, 1)
    f1 = None
    if is_task and preds:
        meta = items[0][2]
        n_classes = len(meta.get("label_ids") or meta.get("candidates"))
        f1 = macro_f1(torch.cat(preds), torch.cat(golds), n_classes)
    has_prompt = not is_task and any(it[1] > 0 for it in items)  # completions, not free text
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50)),
                      accuracy=chosen / max(recs, 1) if choices is not None or is_task else None,
                      exact_match=exact / max(recs, 1) if has_prompt else None,
                      token_accuracy=correct / max(tok, 1), tokens=int(tok), records=int(recs),
                      macro_f1=f1)
