"""`--trainable head`: a learned offset to a few rows of the output head (the answer tokens').

A linear probe on the frozen model's last hidden state is the smallest trainable set that can
still move every answer: on the demo's notes, logistic regression over the six label words'
rows scores 94-96% on valid and 97-100% on test, where the zero-shot rows score 37-38%
(benchmarks/results/head_probe.md). For zeroth-order training that size is the point: the
estimate's variance grows with the coordinates perturbed, and rows x hidden (7 x 576 on the
demo) is a few thousand, against LoRA's hundreds of thousands; and with nothing trained below
the head, each row's hidden states are computed once for the whole run (`zo.feature_cache`).

The offset is its own tensor, not an edit of the head: the head of most small models is tied to
the input embedding, and the rows must change what the model says without changing what it
reads. `RowsHead` wraps the head: its forward (generation) adds `x @ delta.T` to the rows'
logits, and the streamed losses read the head through `patch_chunk` / `patch_rows`
(`loss.PlainHead`, `zo.perturb.Perturber`), which add the offset, or a replica's perturbed copy
of it, to the rows they read. `HeadSpec` saves the token ids and the offset; `merge` unties the
head (`fuse`); `export` keeps the offset beside the tied table (`export.NextToken`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from . import adapter

WEIGHT_KEY = "head_rows.delta"


class RowsHead(nn.Module):
    """The output head `base` plus a trained offset `delta` (k, H) to its rows `ids` (k,)."""

    def __init__(self, base: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("ids", ids.to(torch.long), persistent=False)
        w = base.weight
        self.delta = nn.Parameter(torch.zeros(len(ids), w.shape[1], dtype=w.dtype))

    # the head as its readers know it: the base's tensors (a tied weight stays tied)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @weight.setter
    def weight(self, value) -> None:  # transformers re-ties output embeddings by assignment
        self.base.weight = value

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @property
    def table(self):  # a quantized base's int8 head (`quantize.Int8Head`)
        return getattr(self.base, "table", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        return logits.index_add(-1, self.ids, (x @ self.delta.to(x.dtype).T).to(logits.dtype))

    def rows_in(self, v0: int, v1: int) -> torch.Tensor:
        """Which of the trained rows lie in v0..v1-1 (indices into `ids`)."""
        return ((self.ids >= v0) & (self.ids < v1)).nonzero().flatten()

    def patch_chunk(self, v0: int, v1: int, w: torch.Tensor,
                    delta: torch.Tensor | None = None,
                    sel: torch.Tensor | None = None) -> torch.Tensor:
        """Rows v0..v1-1 of the head `w` with the offset `delta` (default: the trained one)
        added to those of them that are trained (`sel`: `rows_in(v0, v1)`, if known); `w`
        itself when none is."""
        delta = self.delta if delta is None else delta
        sel = self.rows_in(v0, v1) if sel is None else sel
        if sel.numel() == 0:
            return w
        return w.index_add(0, self.ids[sel] - v0, delta[sel].to(w.dtype))

    def patch_rows(self, ids: torch.Tensor, w: torch.Tensor,
                   delta: torch.Tensor | None = None) -> torch.Tensor:
        """The head's rows `ids` (their base rows `w`) with the offset added where trained."""
        delta = self.delta if delta is None else delta
        match = (ids[:, None] == self.ids[None, :]).to(w.dtype)  # (n, k): at most one 1 a row
        return w + match @ delta.to(w.dtype)


class PatchedGroups(Sequence):
    """A chunk's rows per group, each with its group's offset added when read: the losses read
    one group at a time, so one patched copy of the chunk is alive, not one per group."""

    def __init__(self, head: RowsHead, v0: int, v1: int, ws: Sequence[torch.Tensor],
                 deltas: Sequence[torch.Tensor]):
        self.head, self.v0, self.v1, self.ws, self.deltas = head, v0, v1, ws, deltas
        self.sel = head.rows_in(v0, v1)  # the same for every group: found once a chunk

    def __len__(self) -> int:
        return len(self.deltas)

    def __getitem__(self, g):
        return self.head.patch_chunk(self.v0, self.v1, self.ws[g], self.deltas[g], self.sel)

    # the same chunk as a shared base plus each group's offsets to a few of its rows, for a
    # reader that multiplies the base once (`loss.stream_head` when the groups' rows agree)
    @property
    def base(self) -> torch.Tensor:
        return self.ws[0]

    @property
    def cols(self) -> torch.Tensor:
        """The trained rows' positions in the chunk."""
        return self.head.ids[self.sel] - self.v0

    @property
    def offsets(self) -> torch.Tensor | None:
        """(groups, len(cols), H): each group's offsets to `cols`; None when the groups'
        base rows differ (then only `__getitem__` reads them)."""
        if any(w is not self.ws[0] for w in self.ws):
            return None
        return torch.stack([d[self.sel] for d in self.deltas])


def rows_head(model: nn.Module) -> RowsHead | None:
    """The model's `RowsHead` (None: its head has no trained rows)."""
    head = model.get_output_embeddings()
    return head if isinstance(head, RowsHead) else None


def add_rows_head(model: nn.Module, ids: list[int]) -> RowsHead:
    """Wrap `model`'s output head with a zero offset to rows `ids` (sorted, distinct)."""
    if rows_head(model) is not None:
        raise ValueError("the model's head already has trained rows")
    base = model.get_output_embeddings()
    if base is None or not hasattr(base, "weight"):
        raise ValueError(f"{type(model).__name__} has no output head with a weight to offset")
    vocab = base.weight.shape[0]
    ids = sorted(set(int(i) for i in ids))
    if not ids:
        raise ValueError("no head rows to train")
    if ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"head row {ids[0] if ids[0] < 0 else ids[-1]} is outside the "
                         f"vocabulary of {vocab}")
    head = RowsHead(base, torch.tensor(ids))
    model.set_output_embeddings(head)
    return head


def parse_ids(text: str) -> list[int]:
    """`--head-tokens` "12,7,2" -> [2, 7, 12]; a ValueError names what is not a token id."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"--head-tokens {text!r}: {part!r} is not a token id")
        out.append(int(part))
    return sorted(set(out))


def target_tokens(items) -> list[int]:
    """Every token a training split scores, the rows `--trainable head` trains by default:
    a classification task's label words, a multiple-choice task's candidate continuations,
    else the label positions' tokens (completions and their EOS). `items`: encoded
    (ids, n_prompt) or (ids, n_prompt, meta) items."""
    seen: set[int] = set()
    for ids, n_prompt, *meta in items:
        meta = meta[0] if meta else {}
        if "label_ids" in meta:
            seen.update(int(t) for t in meta["label_ids"])
        elif "candidates" in meta:
            seen.update(target_tokens(meta["candidates"]))
        else:
            seen.update(int(t) for t in ids[max(int(n_prompt), 1):])
    return sorted(seen)


@dataclass
class HeadSpec:
    """Trained offsets to the output head's rows `token_ids`."""

    token_ids: list[int] = field(default_factory=list)

    kind: ClassVar[str] = "head"
    peft_type: ClassVar[str | None] = None
    # `export` keeps the offset beside the tied table (one copy of it), not merged
    exported_unmerged: ClassVar[bool] = True

    def save(self, model: nn.Module, path: str | os.PathLike, base_model: str,
             metadata: dict[str, str] | None = None) -> Path:
        head = rows_head(model)
        config = {adapter.KIND_KEY: self.kind, "base_model_name_or_path": base_model,
                  "token_ids": [int(i) for i in head.ids]}
        return adapter.write(path, {WEIGHT_KEY: head.delta.detach().contiguous().clone()},
                             config, metadata)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike) -> "HeadSpec":
        cfg = adapter.read_config(path)
        ids = cfg.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{Path(path) / adapter.ADAPTER_CONFIG}: token_ids must be a list "
                             f"of token ids, not {ids!r}")
        head = rows_head(model) or add_rows_head(model, ids)
        if [int(i) for i in head.ids] != sorted(set(ids)):
            raise ValueError(f"adapter at {path}: its rows {ids} are not the model's trained "
                             f"rows {head.ids.tolist()}")
        adapter.load_into(path, {WEIGHT_KEY: head.delta})
        return cls(token_ids=[int(i) for i in head.ids])

    def merge(self, model: nn.Module) -> int:
        """Fold the offsets into an untied copy of the head (a tied embedding keeps its rows:
        the input is unchanged); the number of rows."""
        head = rows_head(model)
        base = head.base
        w = base.weight.detach().clone()
        w.index_add_(0, head.ids, head.delta.detach().to(w.dtype))
        base.weight = nn.Parameter(w, requires_grad=False)
        model.set_output_embeddings(base)
        model.config.tie_word_embeddings = False
        return len(head.ids)
