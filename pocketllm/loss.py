"""Causal-LM loss that never builds the full (batch, seq, vocab) logits tensor.

The output head of a small model is its largest matmul and its logits its largest activation
(SmolLM2-135M at 8 x 64 tokens: 100 MB of float32 logits, against 2 MB per hidden state). So we
run the backbone, keep only the positions that carry a label, and stream the head over the
vocabulary in chunks with an online log-sum-exp. The same routine serves evaluation, first-order
training (autograd flows through the chunks) and zeroth-order training, where each group of rows
sees its own perturbed copy of the head (see `pocketllm.zo.perturb`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

VOCAB_CHUNK = 2048  # vocab rows per chunk: small enough for the logits to stay in cache
# (first vocab row, end row, weight per group, bias per group or None)
HeadChunk = tuple[int, int, Sequence[torch.Tensor], Sequence[torch.Tensor | None]]


@dataclass
class TokenStats:
    """Per-row sums over the label positions of one batch."""

    nll: torch.Tensor      # (B,) summed negative log-likelihood
    tokens: torch.Tensor   # (B,) number of label tokens
    correct: torch.Tensor  # (B,) label tokens that are the argmax (teacher forced)
    choice_correct: torch.Tensor | None = None  # (B,) first label token is the best choice
    pred: torch.Tensor | None = None   # (B,) predicted class (classification batches only)

    def row_loss(self) -> torch.Tensor:
        return self.nll / self.tokens.clamp(min=1)


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head (not a causal LM)")
    return head


def backbone(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states (B, T, H): the model without its output head."""
    kw = {"use_cache": False} if not is_masked_lm(model) else {}
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def is_masked_lm(model: nn.Module) -> bool:
    """Built as a masked LM by `models.load_model` (the same list of architectures)."""
    from .models import MASKED_LM_TYPES
    return getattr(model.config, "model_type", None) in MASKED_LM_TYPES


def answer_transform(model: nn.Module):
    """What a masked LM's head does to a hidden state before its vocabulary projection
    (RoBERTa: dense, gelu, layer norm; BERT: `cls.predictions.transform`); identity for
    causal LMs, whose head is the projection alone."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "dense") and hasattr(lm_head, "layer_norm"):
        return lambda h: lm_head.layer_norm(torch.nn.functional.gelu(lm_head.dense(h)))
    cls = getattr(model, "cls", None)
    if cls is not None and hasattr(cls, "predictions"):
        return cls.predictions.transform
    return lambda h: h


def class_stats(model: nn.Module, batch: dict[str, torch.Tensor], groups: int = 1,
                head_view=None) -> TokenStats:
    """Prompt-based classification: cross-entropy over the label words at the answer position.

    Only what is needed is computed: the hidden state at `answer_pos` (the last prompt token
    of a causal LM, the mask of a masked LM) times the head rows of the label words, so
    (B, C) logits instead of (B, T, vocab)."""
    hidden = backbone(model, batch)
    B = hidden.shape[0]
    h = answer_transform(model)(hidden[torch.arange(B), batch["answer_pos"]])   # (B, H)
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
    y = batch["class_label"]
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    pred = logits.argmax(1)
    right = (pred == y).float()
    return TokenStats(nll=nll, tokens=torch.ones_like(nll), correct=right.detach(),
                      choice_correct=right.detach(), pred=pred)


def choice_stats(model: nn.Module, batch: dict[str, torch.Tensor], groups: int = 1,
                 head_view=None) -> TokenStats:
    """Multiple choice (COPA): each example's candidates are consecutive rows; a candidate's
    score is its mean per-token log-likelihood, and the loss is the cross-entropy of the
    right one among them. One entry per example."""
    lm = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    s = token_stats(model, lm, groups, head_view)
    C = int(batch["n_choices"][0])
    score = (-s.row_loss()).view(-1, C)                                            # (E, C)
    y = batch["choice_label"].view(-1, C).argmax(1)
    nll = torch.nn.functional.cross_entropy(score, y, reduction="none")
    pred = score.argmax(1)
    right = (pred == y).float()
    return TokenStats(nll=nll, tokens=torch.ones_like(nll), correct=right.detach(),
                      choice_correct=right.detach(), pred=pred)


def n_scored(batch: dict[str, torch.Tensor]) -> int:
    """What a batch's loss is averaged over: label tokens (LM), rows (classification) or
    examples (multiple choice)."""
    if "class_label" in batch:
        return int(batch["class_label"].shape[0])
    if "choice_label" in batch:
        return int(batch["choice_label"].shape[0] // int(batch["n_choices"][0]))
    return int((batch["labels"][:, 1:] != -100).sum())


class PlainHead:
    """The output head as the losses read it (`head_view`): its own weights, shared by every
    group. A zeroth-order method that trains the head passes its perturbed view instead (the
    same two methods: `zo.perturb.PerturbedHead`)."""

    def __init__(self, head: nn.Module):
        self.head = head

    def chunks(self, groups: int) -> Iterator[HeadChunk]:
        """All rows, in VOCAB_CHUNK-row chunks: (v0, v1, weights per group, biases per group);
        views of the head's rows, every group sharing them."""
        w, b = self.head.weight, getattr(self.head, "bias", None)
        for v0 in range(0, w.shape[0], VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, w.shape[0])
            bc = None if b is None else b[v0:v1]
            yield v0, v1, [w[v0:v1]] * groups, [bc] * groups

    def rows(self, ids: torch.Tensor, groups: int
             ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Rows `ids` (weight, bias) per group: a classification loss needs the label words'."""
        b = getattr(self.head, "bias", None)
        return [self.head.weight[ids]] * groups, [None if b is None else b[ids]] * groups


def token_stats(model: nn.Module, batch: dict[str, torch.Tensor], groups: int = 1,
                head_view=None, choices: torch.Tensor | None = None) -> TokenStats:
    """Run the backbone and the chunked head; rows split into `groups` equal groups.

    `head_view` gives the output head's rows (`.chunks(groups)` yields `HeadChunk`s); by
    default `PlainHead`, the head's own weights.
    `choices`: token ids of a closed label set; then each row's first label token is also
    classified among them (logits of those rows of the head only).

    The batch's keys choose the objective: `class_label` (with `answer_pos`, `label_ids`) is
    prompt-based classification, `choice_label` multiple choice (see `class_stats`,
    `choice_stats`); otherwise the causal-LM loss on the `labels` positions.
    """
    if "class_label" in batch:
        return class_stats(model, batch, groups, head_view)
    if "choice_label" in batch:
        return choice_stats(model, batch, groups, head_view)
    labels = batch["labels"]
    hidden = backbone(model, batch)
    # Position t predicts token t+1: keep only positions whose next token is a label.
    targets = labels[:, 1:]
    sel = targets != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[sel]
    h = hidden[:, :-1][sel]                     # (N, H)
    tgt = targets[sel]                          # (N,)
    B = labels.shape[0]
    per_group = B // groups
    group_of = rows // per_group
    head = output_head(model)
    chunks = (head_view or PlainHead(head)).chunks(groups)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    N = h.shape[0]
    run_max = h.new_full((N,), float("-inf"), dtype=torch.float32)
    run_sum = h.new_zeros((N,), dtype=torch.float32)
    tgt_logit = h.new_zeros((N,), dtype=torch.float32)
    idx = [torch.nonzero(group_of == g).squeeze(1) for g in range(groups)]
    hs = [h if groups == 1 else h[i] for i in idx]  # each group's rows, gathered once
    # Without autograd the chunk's logits live in two buffers reused by every chunk, and exp()
    # runs in place: no per-chunk allocation of (rows x chunk) temporaries, which fragmented
    # the heap (the peak of identical bf16 runs varied by 200 MB with 2 threads).
    inplace = not torch.is_grad_enabled()
    bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for v0, v1, ws, bs in chunks:
        for g in range(groups):
            if idx[g].numel() == 0:
                continue
            hg = hs[g]
            w = ws[g].to(hg.dtype)
            if inplace:
                n = hg.shape[0] * w.shape[0]
                if g not in bufs or bufs[g][0].numel() < n:
                    bufs[g] = (hg.new_empty(n), hg.new_empty(0 if hg.dtype == torch.float32
                                                             else n, dtype=torch.float32))
                raw = bufs[g][0][:n].view(hg.shape[0], w.shape[0])
                torch.mm(hg, w.T, out=raw)
                if bs[g] is not None:
                    raw.add_(bs[g])
                logits = raw if raw.dtype == torch.float32 else \
                    bufs[g][1][:n].view_as(raw).copy_(raw)
                if softcap:
                    logits.div_(softcap).tanh_().mul_(softcap)
            else:
                logits = hg @ w.T
                if bs[g] is not None:
                    logits = logits + bs[g]
                logits = logits.float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
            # Online log-sum-exp: rescale the running sum when a larger max appears.
            cmax = logits.max(dim=1).values
            m_old = run_max[idx[g]]
            m_new = torch.maximum(m_old, cmax)
            t = tgt[idx[g]]
            inside = (t >= v0) & (t < v1)
            picked = logits.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            tgt_logit = tgt_logit.index_put((idx[g],), torch.where(inside, picked, tgt_logit[idx[g]]))
            if inplace:  # (picked is a copy: the logits may now be overwritten)
                chunk_sum = logits.sub_(m_new[:, None]).exp_().sum(1)
            else:
                chunk_sum = torch.exp(logits - m_new[:, None]).sum(1)
            s = run_sum[idx[g]] * torch.exp(m_old - m_new) + chunk_sum
            run_max = run_max.index_put((idx[g],), m_new)
            run_sum = run_sum.index_put((idx[g],), s)
    nll = run_max + torch.log(run_sum) - tgt_logit
    # The label is the argmax iff its logit equals the running max (ties count as correct).
    correct = (tgt_logit >= run_max).float()
    zeros = h.new_zeros((B,), dtype=torch.float32)
    choice_correct = None
    if choices is not None and N:
        # first label position of each row (rows are in order, positions ascending)
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        hf, tf = h[first], tgt[first]
        w = head.weight[choices]
        cl = hf @ w.to(hf.dtype).T
        if getattr(head, "bias", None) is not None:
            cl = cl + head.bias[choices]
        pred = choices[cl.argmax(1)]
        choice_correct = zeros.index_put((rows[first],), (pred == tf).float())
    return TokenStats(
        nll=zeros.index_add(0, rows, nll),
        tokens=zeros.index_add(0, rows, torch.ones_like(nll)),
        correct=zeros.index_add(0, rows, correct.detach()),
        choice_correct=choice_correct,
    )


def group_losses(stats: TokenStats, groups: int) -> torch.Tensor:
    """Token-weighted mean loss of each group of rows: (groups,)."""
    nll = stats.nll.reshape(groups, -1).sum(1)
    tok = stats.tokens.reshape(groups, -1).sum(1)
    return nll / tok.clamp(min=1)
