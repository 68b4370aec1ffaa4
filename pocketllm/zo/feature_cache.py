"""A frozen backbone's hidden states, computed once per training row and reused.

When nothing below the output head trains (`--trainable head`: offsets to the head's rows),
the backbone's output for a row never changes: every replica of every step that sees the row
gets the same hidden states. So a zeroth-order pass computes each distinct row once, alone
(one unpadded forward: the result does not depend on the batch it came in, so a resumed run
reads what an uninterrupted one did, bit for bit), keeps it, and from then on a step costs only
the head: on the demo's notes at batch 8, the backbone was ~90% of a step.

`FeatureCache.serving(model, groups)` is a context in which `model.base_model`'s forward, given
a batch repeated `groups` times, returns the cached hidden states of its rows (right padding:
the positions past a row's length are zeros, which no loss reads). Rows are keyed by their
tokens; the cache holds at most `limit_mb` and computes rows past that afresh each time.
The valid split, scored every `--steps-per-eval` steps, reads its rows from the same cache
(`TorchEngine.scorer`); the final test split, scored once, runs whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..loss import is_masked_lm


def backbone_is_frozen(model: nn.Module, params) -> bool:
    """True when none of the trainable tensors `params` ([(name, tensor)]) is inside the
    backbone (`model.base_model`): its output is then the same for every replica and step."""
    inside = {id(p) for p in model.base_model.parameters()}
    return not any(id(p) in inside for _, p in params)


class FeatureCache:
    def __init__(self, limit_mb: float = 512.0):
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.limit = int(limit_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0

    def _row(self, model: nn.Module, forward, ids: tuple[int, ...]) -> torch.Tensor:
        h = self.rows.get(ids)
        if h is not None:
            self.hits += 1
            return h
        self.misses += 1
        x = torch.tensor([ids])
        kw = {} if is_masked_lm(model) else {"use_cache": False}
        out = forward(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]
        if self.bytes + h.numel() * h.element_size() <= self.limit:
            self.rows[ids] = h
            self.bytes += h.numel() * h.element_size()
        return h

    @contextmanager
    def serving(self, model: nn.Module, groups: int):
        """Within the block, `model.base_model(input_ids=, attention_mask=)` on a batch
        repeated `groups` times returns the cached last hidden states of its rows."""
        base = model.base_model
        orig = base.forward

        def forward(input_ids=None, attention_mask=None, **kw):
            B, T = input_ids.shape
            n = B // groups
            mask = attention_mask[:n]
            lengths = mask.sum(1)
            # right padding only: a row's tokens are its first `length` positions
            prefix = torch.arange(T)[None, :] < lengths[:, None]
            if B % groups or not torch.equal(mask.bool(), prefix):
                return orig(input_ids=input_ids, attention_mask=attention_mask, **kw)
            lengths = lengths.tolist()
            hs = [self._row(model, orig, tuple(input_ids[i, :L].tolist()))
                  for i, L in enumerate(lengths)]
            out = hs[0].new_zeros((n, T, hs[0].shape[-1]))
            for i, h in enumerate(hs):
                out[i, : h.shape[0]] = h
            if groups > 1:
                out = out.repeat(groups, 1, 1)
            return SimpleNamespace(last_hidden_state=out)

        base.forward = forward
        try:
            yield
        finally:
            del base.forward  # back to the class's forward
