"""Frozen bottom layers run once for all replicas of a zeroth-order pass.

A batched ZO pass repeats the batch once per replica (prge: q + 1 copies with FZOO's
estimate, 2q with SPSA's) and each replica sees its own perturbation of the trainable tensors.
Below the first layer that holds a trainable tensor every replica computes exactly the same
thing, so those layers can run on the batch once and their output be repeated per replica at
the first trainable layer. With LoRA on the last L of N layers (`--lora-layers L`) a pass then
costs about (N - L) / N of a forward of the batch plus L / N of a forward of all replicas,
instead of a forward of all replicas: at q = 8, batch 2 (18 rows) and L = 4 of 30 layers, a
quarter.

`first_trained_layer` says where the shared part ends: N (every layer shared) when all that
is trained is the final norm after the N layers (`--trainable norm --norm-layers 0`), None
when nothing can be shared (a trainable embedding or prefix: it comes before every layer);
`shared_prefix` runs a forward that way. The replicas' losses are those of the repeated batch
up to the float rounding of matmuls over fewer rows (`tests/zo/test_shared.py`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..loss import decoder_layers
from ..lora import layer_of
from ..trainable import final_norms


def first_trained_layer(model: nn.Module, names: Sequence[str]) -> int | None:
    """The index of the lowest decoder layer holding one of the trainable tensors `names`,
    counting a final norm as layer N (after the N layers); None when one of them sits
    elsewhere outside the numbered layers (an embedding or prefix comes before them: then no
    layer is the same for every replica) or when the lowest is layer 0."""
    try:
        n = len(decoder_layers(model))
    except ValueError:
        return None
    after = tuple(f"{name}." for name, _ in final_norms(model))
    layers = [n if i is None and name.startswith(after) else i
              for name, i in ((name, layer_of(name)) for name in names)]
    if not layers or any(i is None for i in layers):
        return None
    first = min(layers)
    return first if first > 0 else None


@contextmanager
def shared_prefix(model: nn.Module, first: int, groups: int) -> Iterator[None]:
    """Within the block, a forward of `model.base_model` given a batch repeated `groups`
    times along dim 0 runs layers below `first` on one copy of it, and repeats the hidden
    states (and every per-row argument of the layers from `first` on: masks, positions,
    rotary tables) `groups` times as they enter layer `first` (the final norm when `first`
    is the number of layers)."""
    layers = decoder_layers(model)
    state: dict = {"rows": 0, "cache": {}}

    def cut(_mod, args, kwargs):
        # the batch arrives repeated (the objectives' contract); keep its first copy
        def first_copy(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.shape[0] % groups:
                    raise RuntimeError(f"shared prefix: a batch of {v.shape[0]} rows is not "
                                       f"{groups} equal groups")
                return v[: v.shape[0] // groups]
            return v
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["rows"] = ids.shape[0] // groups
        state["cache"] = {}
        return tuple(first_copy(a) for a in args), {k: first_copy(v) for k, v in kwargs.items()}

    def grow(v):
        # per-row tensors of the one-copy batch (a broadcast row of 1 is grown too: harmless)
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == state["rows"]:
            out = state["cache"].get(id(v))
            if out is None:
                out = state["cache"][id(v)] = v.repeat(groups, *([1] * (v.dim() - 1)))
            return out
        if isinstance(v, tuple):
            return tuple(grow(x) for x in v)
        return v

    def widen(_mod, args, kwargs):
        return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}

    # the first trained module on: layers first.., or (first == N) the final norm
    grown = (list(layers)[first:] if first < len(layers)
             else [m for _, m in final_norms(model)])
    handles = [model.base_model.register_forward_pre_hook(cut, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(widen, with_kwargs=True) for m in grown]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        state["cache"] = {}
