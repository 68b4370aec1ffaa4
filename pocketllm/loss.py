"""The output head's losses, without the full (batch, seq, vocab) logits tensor.

The output head of a small model is its largest matmul and its logits its largest activation
(SmolLM2-135M at 8 x 64 tokens: 100 MB of float32 logits, against 2 MB per hidden state). So an
objective runs the backbone, keeps only the positions it scores, and `stream_head` streams the
head over the vocabulary in chunks with an online log-sum-exp. The same pass serves evaluation,
first-order training (autograd flows through the chunks), zeroth-order training, where each
group of rows sees its own perturbed copy of the head (see `pocketllm.zo.perturb`), and split
mode's head gradient (`split.side.head_loss_grad`). What is scored, and how, is the objective's
(`pocketllm.objectives`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

VOCAB_CHUNK = 2048  # vocab rows per chunk: small enough for the logits to stay in cache
# (first vocab row, end row, weight per group, bias per group or None)
HeadChunk = tuple[int, int, Sequence[torch.Tensor], Sequence[torch.Tensor | None]]
# set within `recomputed_head()`: the autograd path saves no chunk's logits (see there)
_RECOMPUTE: ContextVar[bool] = ContextVar("recompute_head", default=False)


@dataclass
class TokenStats:
    """Per-entry sums of one batch's loss: an entry is a row (language modelling,
    classification) or an example (multiple choice); see `pocketllm.objectives`."""

    nll: torch.Tensor      # (B,) summed negative log-likelihood
    tokens: torch.Tensor   # (B,) number of label tokens (1 per entry for a class objective)
    correct: torch.Tensor  # (B,) label tokens that are the argmax (teacher forced)
    choice_correct: torch.Tensor | None = None  # (B,) first label token is the best choice
    pred: torch.Tensor | None = None   # (B,) predicted class (classification batches only)

    def row_loss(self) -> torch.Tensor:
        return self.nll / self.tokens.clamp(min=1)


@dataclass
class HeadPass:
    """What `stream_head` keeps of each scored row's logits (all (N,) float32)."""

    lse: torch.Tensor     # log-sum-exp over the vocabulary
    target: torch.Tensor  # the target token's logit
    top: torch.Tensor     # the largest logit
    mean_row: torch.Tensor | None = None  # (N, H) softmax-weighted mean of the head's rows

    @property
    def nll(self) -> torch.Tensor:
        return self.lse - self.target

    @property
    def correct(self) -> torch.Tensor:
        """1 where the target is the argmax (ties count as correct)."""
        return (self.target >= self.top).float()


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (llama, gpt2, opt, gemma, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for m in model.base_model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


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


class PlainHead:
    """The output head as the losses read it (`head_view`): its own weights, shared by every
    group. A zeroth-order method that trains the head passes its perturbed view instead (the
    same two methods: `zo.perturb.PerturbedHead`)."""

    def __init__(self, head: nn.Module):
        self.head = head

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "PlainHead":
        """The head given by its tensors (split mode holds those, not the module)."""
        return cls(SimpleNamespace(weight=weight, bias=bias))

    def chunks(self, groups: int) -> Iterator[HeadChunk]:
        """All rows, in VOCAB_CHUNK-row chunks: (v0, v1, weights per group, biases per group);
        views of the head's rows, every group sharing them (a quantized base's int8 head,
        `quantize.Int8Head`: each chunk dequantized as it is read)."""
        table = getattr(self.head, "table", None)  # int8 rows: read a block at a time
        w, b = (table if table is not None else self.head.weight), getattr(self.head, "bias", None)
        patch = getattr(self.head, "patch_chunk", None)  # trained rows (head_rows.RowsHead)
        for v0 in range(0, w.shape[0], VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, w.shape[0])
            bc = None if b is None else b[v0:v1]
            wc = w[v0:v1] if table is None else table.block(v0, v1)
            if patch is not None:
                wc = patch(v0, v1, wc)
            yield v0, v1, [wc] * groups, [bc] * groups

    def rows(self, ids: torch.Tensor, groups: int
             ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Rows `ids` (weight, bias) per group: a classification loss needs the label words'."""
        b = getattr(self.head, "bias", None)
        table = getattr(self.head, "table", None)
        w = self.head.weight[ids] if table is None else table.rows(ids)
        patch = getattr(self.head, "patch_rows", None)  # trained rows (head_rows.RowsHead)
        if patch is not None:
            w = patch(ids, w)
        return [w] * groups, [None if b is None else b[ids]] * groups


def stream_head(h: torch.Tensor, targets: torch.Tensor, chunks: Iterable[HeadChunk],
                group_of: torch.Tensor | None = None, groups: int = 1,
                softcap: float | None = None, mean_row: bool = False) -> HeadPass:
    """Each row's log-sum-exp and target logit under the output head, streamed over the
    vocabulary: the one chunked head pass of every full-vocabulary loss (the causal LM, split
    mode's head gradient, the masked-LM workload).

    `h` (N, H) are the scored hidden states and `targets` (N,) their token ids; `chunks`
    yields `HeadChunk`s (`PlainHead(head).chunks(groups)` or a perturbed view); row i reads
    the weights of group `group_of[i]` (None: every row is in group 0). No (N, vocab) logits
    are built: each chunk's logits are folded into a running max and sum (online
    log-sum-exp), so the peak is one (rows x VOCAB_CHUNK) block. Autograd flows through when
    it is enabled; without it the block lives in reused buffers and exp() runs in place.

    `mean_row`: also the softmax-weighted mean of the head's rows, sum_v p_v W_v (N, H),
    float32, accumulated in the same pass (the cross-entropy's gradient w.r.t. h is that
    minus W[target]); needs the logits to be h @ W.T + b, so no `softcap`."""
    if mean_row and softcap:
        raise ValueError("stream_head: mean_row is the gradient of uncapped logits only")
    if _RECOMPUTE.get() and torch.is_grad_enabled() and groups == 1 and not mean_row:
        return _recomputed(h, targets, list(chunks), softcap)
    N = h.shape[0]
    if group_of is None:
        group_of = torch.zeros(N, dtype=torch.long, device=h.device)
    idx = [torch.nonzero(group_of == g).squeeze(1) for g in range(groups)]
    if groups > 1 and not mean_row and not torch.is_grad_enabled() and \
            _same_rows(h, targets, idx):
        return _shared_rows(h, targets, chunks, idx, softcap)
    run_max = h.new_full((N,), float("-inf"), dtype=torch.float32)
    run_sum = h.new_zeros((N,), dtype=torch.float32)
    tgt_logit = h.new_zeros((N,), dtype=torch.float32)
    acc = h.new_zeros((N, h.shape[1]), dtype=torch.float32) if mean_row else None
    hs = [h if groups == 1 else h[i] for i in idx]  # each group's rows, gathered once
    # Without autograd the chunk's logits live in two buffers reused by every chunk, and exp()
    # runs in place: no per-chunk allocation of (rows x chunk) temporaries, which fragmented
    # the heap (the peak of identical bf16 runs varied by 200 MB with 2 threads).
    inplace = not torch.is_grad_enabled()
    bufs: list[torch.Tensor] = []
    rows_of: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def fold(v0: int, v1: int, w: torch.Tensor, b: torch.Tensor | None, gs: list[int]) -> None:
        """Fold chunk v0..v1 (rows `w`, bias `b`) into the running figures of groups `gs`."""
        nonlocal run_max, run_sum, tgt_logit, acc
        key = tuple(gs)
        if key not in rows_of:  # the groups' rows, gathered once per run of groups
            sel = idx[gs[0]] if len(gs) == 1 else torch.cat([idx[g] for g in gs])
            rows_of[key] = (sel, hs[gs[0]] if len(gs) == 1 else h[sel])
        sel, hg = rows_of[key]
        w = w.to(hg.dtype)
        if inplace:
            n = hg.shape[0] * w.shape[0]
            if not bufs or bufs[0].numel() < n:
                bufs[:] = [hg.new_empty(n), hg.new_empty(0 if hg.dtype == torch.float32 else n,
                                                         dtype=torch.float32)]
            raw = bufs[0][:n].view(hg.shape[0], w.shape[0])
            torch.mm(hg, w.T, out=raw)
            if b is not None:
                raw.add_(b)
            logits = raw if raw.dtype == torch.float32 else bufs[1][:n].view_as(raw).copy_(raw)
            if softcap:
                logits.div_(softcap).tanh_().mul_(softcap)
        else:
            logits = hg @ w.T
            if b is not None:
                logits = logits + b
            logits = logits.float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        # Online log-sum-exp: rescale the running sum when a larger max appears.
        cmax = logits.max(dim=1).values
        m_old = run_max[sel]
        m_new = torch.maximum(m_old, cmax)
        t = targets[sel]
        inside = (t >= v0) & (t < v1)
        picked = logits.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        tgt_logit = tgt_logit.index_put((sel,), torch.where(inside, picked, tgt_logit[sel]))
        if inplace:  # (picked is a copy: the logits may now be overwritten)
            p = logits.sub_(m_new[:, None]).exp_()
        else:
            p = torch.exp(logits - m_new[:, None])
        scale = torch.exp(m_old - m_new)
        s = run_sum[sel] * scale + p.sum(1)
        if acc is not None:  # the same rescaling for the weighted sum of rows
            acc = acc.index_put((sel,), acc[sel] * scale[:, None] + p @ w.float())
        run_max = run_max.index_put((sel,), m_new)
        run_sum = run_sum.index_put((sel,), s)

    for v0, v1, ws, bs in chunks:
        # Consecutive groups that read the same rows (a frozen head; rows no group perturbs)
        # share one matmul: a (rows x H) by (H x chunk) product is bound by reading the
        # chunk, so G groups of a few rows each cost ~1/G of G products. A group's own copy
        # is read (and, for a lazy view, built) only when its turn comes: one alive at a time.
        run: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None
        for g in range(groups):
            if idx[g].numel() == 0:
                continue
            w, b = ws[g], bs[g]
            if run is not None and w is run[0] and b is run[1]:
                run[2].append(g)
                continue
            if run is not None:
                fold(v0, v1, *run)
            run = (w, b, [g])
        if run is not None:
            fold(v0, v1, *run)
    return HeadPass(lse=run_max + torch.log(run_sum), target=tgt_logit, top=run_max,
                    mean_row=None if acc is None else acc / run_sum[:, None])


def _same_rows(h: torch.Tensor, targets: torch.Tensor, idx: list[torch.Tensor]) -> bool:
    """Every group scores the same hidden states with the same targets (a frozen backbone's
    rows served to every replica by `zo.feature_cache`): one read of N x H floats, against
    the head's N x H x vocab multiply-adds it may save."""
    first = idx[0]
    if any(i.numel() != first.numel() for i in idx[1:]):
        return False
    h0, t0 = h[first], targets[first]
    return all(torch.equal(h[i], h0) and torch.equal(targets[i], t0) for i in idx[1:])


def _piece(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(logit - max)) over the last dimension: one block's log-sum-exp."""
    m = logits.amax(-1)
    return m, torch.exp(logits - m[..., None]).sum(-1)


def _merge(run_max, run_sum, m, s) -> tuple[torch.Tensor, torch.Tensor]:
    """The running (max, sum) with a block's (`m`, `s`) folded in (online log-sum-exp)."""
    new = torch.maximum(run_max, m)
    return new, run_sum * torch.exp(run_max - new) + s * torch.exp(m - new)


def _pick(logits: torch.Tensor, t: torch.Tensor, v0: int, v1: int, was: torch.Tensor):
    """Each row's target logit where its target `t` lies in the chunk v0..v1-1, else `was`."""
    got = logits.gather(-1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(-1)
    return torch.where((t >= v0) & (t < v1), got, was)


def _shared_rows(h, targets, chunks: Iterable[HeadChunk], idx: list[torch.Tensor],
                 softcap: float | None) -> HeadPass:
    """`stream_head` when every group has the same rows (`_same_rows`): the groups differ only
    in the head they read, so a chunk they all read is multiplied once, for one group's rows.
    A chunk to a few of whose rows each group adds its own offsets (`offsets`, as
    `head_rows.PatchedGroups` gives them) is multiplied once too, those rows' columns set
    aside; each group then scores them with its offsets, (rows x k) more numbers. The groups'
    head reads cost one read of the head, not G (the demo's 17 replicas: ~7x faster steps)."""
    G, first = len(idx), idx[0]
    h0, t0 = h[first], targets[first]
    n = h0.shape[0]
    run_max = h0.new_full((G, n), float("-inf"), dtype=torch.float32)
    run_sum = h0.new_zeros((G, n), dtype=torch.float32)
    tgt = h0.new_zeros((G, n), dtype=torch.float32)

    def raw(w, b):  # a chunk's float32 logits before any cap
        x = h0 @ w.to(h0.dtype).T
        return (x if b is None else x + b).float()

    def cap(x):
        return torch.tanh(x / softcap) * softcap if softcap else x

    for v0, v1, ws, bs in chunks:
        offsets = getattr(ws, "offsets", None)
        base, b = ws.base if offsets is not None else ws[0], bs[0]
        if not all(bs[g] is b for g in range(G)) or (
                offsets is None and not all(ws[g] is base for g in range(G))):
            for g in range(G):  # each group its own rows of this chunk: one product each
                lg = cap(raw(ws[g], bs[g]))
                run_max[g], run_sum[g] = _merge(run_max[g], run_sum[g], *_piece(lg))
                tgt[g] = _pick(lg, t0, v0, v1, tgt[g])
            continue
        r = raw(base, b)
        lg = cap(r)
        tgt = _pick(lg, t0, v0, v1, tgt)  # every group: the same base logit...
        cols = ws.cols if offsets is not None else None
        if cols is not None and cols.numel():
            # ...but at the offset rows, each group's own: base + h . offset (G, n, k)
            off = offsets.to(h0.dtype)
            own = cap(r[:, cols][None] + (h0 @ off.reshape(-1, off.shape[-1]).T)
                      .float().view(n, G, -1).transpose(0, 1))
            hit = t0[:, None] == (cols + v0)[None, :]                    # (n, k)
            at = hit.float().argmax(1)[None, :, None].expand(G, n, 1)
            tgt = torch.where(hit.any(1)[None], own.gather(2, at).squeeze(2), tgt)
            run_max, run_sum = _merge(run_max, run_sum, *_piece(own))
            if cols.numel() == v1 - v0:
                continue  # every column of the chunk was an offset row
            lg = lg.index_fill(1, cols, float("-inf"))
        run_max, run_sum = _merge(run_max, run_sum, *_piece(lg))
    N = h.shape[0]
    out = [h.new_zeros((N,), dtype=torch.float32) for _ in range(3)]
    for g, i in enumerate(idx):
        for o, v in zip(out, (run_max[g] + torch.log(run_sum[g]), tgt[g], run_max[g])):
            o[i] = v
    return HeadPass(lse=out[0], target=out[1], top=out[2])


@contextmanager
def recomputed_head() -> Iterator[None]:
    """Within the block, a `stream_head` under autograd (one group, no `mean_row`) keeps no
    chunk's logits for the backward: only its inputs and, per scored row, the log-sum-exp (the
    backward recomputes each chunk's logits, one chunk alive at a time: one more head matmul)
    or, when only the hidden states need a gradient and the logits are uncapped (LoRA), the
    softmax-weighted mean of the head's rows (no more matmuls than the plain path). The plain
    autograd path keeps every chunk's float32 exp(): 4 bytes per scored position per vocabulary
    row (SmolLM2 at 8 x 64: 95 MB), more than the whole model's checkpointed activations. The
    forward's figures are the no-grad pass's (the autograd path's, bit for bit)."""
    token = _RECOMPUTE.set(True)
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


def _recomputed(h: torch.Tensor, targets: torch.Tensor, chunks: list[HeadChunk],
                softcap: float | None) -> HeadPass:
    ws = [w[0] for _, _, w, _ in chunks]
    bs = [b[0] for _, _, _, b in chunks]
    spans = [(v0, v1) for v0, v1, _, _ in chunks]
    lse, target, top = _RecomputedHead.apply(h, targets, spans, softcap, *ws, *bs)
    return HeadPass(lse=lse, target=target, top=top)


class _RecomputedHead(torch.autograd.Function):
    """(lse, target logit, top logit) of `stream_head` with the chunks' weights `wb` (weights,
    then biases, None where there are none). When only the hidden states need a gradient and
    the logits are uncapped (LoRA), the forward also accumulates the softmax-weighted mean of
    the head's rows (`mean_row`), from which the backward has the gradient at once; else the
    backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h, targets, spans, softcap, *wb):
        n = len(spans)
        ws, bs = wb[:n], wb[n:]
        rows_only = not softcap and not any(ctx.needs_input_grad[4:])
        # autograd is off in here: the in-place, buffer-reusing pass
        p = stream_head(h, targets, ((v0, v1, [w], [b]) for (v0, v1), w, b in zip(spans, ws, bs)),
                        softcap=softcap, mean_row=rows_only)
        ctx.spans, ctx.softcap, ctx.bias = spans, softcap, [b is not None for b in bs]
        ctx.rows_only = rows_only
        ctx.save_for_backward(h, targets, p.mean_row if rows_only else p.lse, *ws,
                              *(b for b in bs if b is not None))
        ctx.mark_non_differentiable(p.top)
        return p.lse, p.target, p.top

    @staticmethod
    def backward(ctx, g_lse, g_tgt, _g_top):
        h, targets, lse_or_mean, *saved = ctx.saved_tensors
        n = len(ctx.spans)
        ws, it = saved[:n], iter(saved[n:])
        bs = [next(it) if has else None for has in ctx.bias]
        need = ctx.needs_input_grad
        need_h, need_w, need_b = need[0], need[4:4 + n], need[4 + n:]
        zeros = h.new_zeros(h.shape[:1], dtype=torch.float32)
        g_lse = zeros if g_lse is None else g_lse
        g_tgt = zeros if g_tgt is None else g_tgt
        if ctx.rows_only:
            # d lse / d h = sum_v softmax_v W_v (the forward's mean_row); d target / d h = W_t
            dh = g_lse[:, None] * lse_or_mean
            for (v0, v1), w in zip(ctx.spans, ws):
                rows = torch.nonzero((targets >= v0) & (targets < v1)).squeeze(1)
                dh[rows] += g_tgt[rows, None] * w[targets[rows] - v0].float()
            return (dh.to(h.dtype), None, None, None, *[None] * len(need[4:]))
        lse = lse_or_mean
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dws, dbs = [None] * n, [None] * n
        for i, ((v0, v1), w0, b) in enumerate(zip(ctx.spans, ws, bs)):
            w = w0.to(h.dtype)
            logits = h @ w.T  # as the forward computed them
            if b is not None:
                logits = logits + b
            logits = logits.float()
            if ctx.softcap:
                capped = torch.tanh(logits / ctx.softcap)
                logits = capped * ctx.softcap
            # d lse / d logit = softmax; d target / d logit = 1 at the target's column
            dl = torch.exp(logits - lse[:, None]).mul_(g_lse[:, None])
            rows = torch.nonzero((targets >= v0) & (targets < v1)).squeeze(1)
            dl[rows, targets[rows] - v0] += g_tgt[rows]
            if ctx.softcap:  # through c * tanh(x / c)
                dl.mul_(1 - capped * capped)
            dl = dl.to(h.dtype)
            if need_h:
                dh += (dl @ w).float()
            if need_w[i]:
                dws[i] = (dl.T @ h).to(w0.dtype)
            if b is not None and need_b[i]:
                dbs[i] = dl.sum(0).to(b.dtype)
        return (None if dh is None else dh.to(h.dtype), None, None, None, *dws, *dbs)


def group_losses(stats: TokenStats, groups: int) -> torch.Tensor:
    """Token-weighted mean loss of each group of rows: (groups,)."""
    nll = stats.nll.reshape(groups, -1).sum(1)
    tok = stats.tokens.reshape(groups, -1).sum(1)
    return nll / tok.clamp(min=1)
