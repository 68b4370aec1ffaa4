"""Just-in-time weight perturbation for zeroth-order training.

MeZO perturbs the stored weights in place (w += eps z, w -= 2 eps z, w += eps z, then the update),
regenerating z four times a step and letting rounding error pile up in the stored weights. Here
the stored weights are never perturbed. Each module that owns a trainable parameter gets a
wrapped forward that builds its perturbed copies (W + eps z, W - eps z) in a scratch buffer right
before use and drops them after, so:

* the +eps and -eps passes run as ONE forward over the batch duplicated into two row groups, each
  group seeing its own copy of every perturbed weight: z is generated once per step;
* the SGD update of step t (w -= lr g_t z_t) is deferred and fused into the kernel call that
  builds step t+1's copies: a second, not a fourth, generation per step;
* the stored weights change only by the update itself, so there is no drift to bound: with a
  zero learning rate they stay bit-for-bit identical after any number of steps, in any dtype.

z is a counter-based function of (key, element index) (`pocketllm.zo.noise`), so any slice of a
weight (an embedding row, a chunk of the output head) gets the same noise as the whole. What z is
for each tensor is the run's `Perturbation` (`pocketllm.zo.perturbations`): dense z by default,
built by the fused kernel; a sparse or low-rank one is built by its own (pure torch) code, its
queued update applied before the copies instead of fused into them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora import LoRALinear
from .. import loss
from ..head_rows import PatchedGroups
from ..loss import HeadChunk, output_head
from .perturbations import Perturbation
from .perturbations.dense import Dense


class Perturber:
    """Owns the trainable parameters of a ZO run and their pending update."""

    def __init__(self, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]],
                 dist: str = "gaussian", perturbation: Perturbation | None = None):
        self.model, self.dist = model, dist
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        # what z is for each tensor (default: dense noise of the key, the fused kernel)
        self.z = perturbation if perturbation is not None else Dense(self.params, dist)
        index = {id(p): i for i, p in enumerate(self.params)}
        # module -> [(attribute, parameter index)] for the trainable parameters it owns itself
        self.owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for mod in model.modules():
            own = [(a, index[id(p)]) for a, p in mod.named_parameters(recurse=False)
                   if id(p) in index]
            if own:
                self.owners[mod] = own
        self.head = output_head(model)
        # param index -> [(key, coef)]: p += coef * z(key), applied in this order
        self.pending: dict[int, list[tuple[int, float]]] = {}
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # set while a perturbed forward runs: group g perturbs parameter i with group_keys[g][i]
        self.group_keys: list[list[int]] = []
        self.eps = 0.0
        self.signs: tuple[float, ...] = ()
        self.rows = 0

    # ---- the deferred update ------------------------------------------------------------
    def schedule_update(self, keys: Sequence[int], coef: float) -> None:
        """Queue p += coef * z(keys[i]) for every parameter, applied at its next use."""
        self.schedule_updates([(keys, coef)])

    def schedule_updates(self, updates: Sequence[tuple[Sequence[int], float]]) -> None:
        """Queue several seeded updates (one per query: its keys and coefficient), applied to
        each parameter in this order at its next use."""
        if self.pending:
            self.flush()
        for keys, coef in updates:
            if coef != 0.0:
                for i, k in enumerate(keys):
                    self.pending.setdefault(i, []).append((k, coef))

    def flush(self) -> None:
        """Apply every queued update now (before evaluation, saving, or the end of training)."""
        with torch.no_grad():
            for i in list(self.pending):
                self._apply_pending(i)

    def _apply_pending(self, i: int) -> None:
        self.z.add_(i, self.params[i].data, self.pending.pop(i))

    # ---- building perturbed copies --------------------------------------------------------
    def _buf(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        # Reused across modules: a copy lives only for the duration of one module's forward.
        key = (slot, like.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=like.dtype)
            self._scratch[key] = buf
        return buf[: like.numel()].view(like.shape)

    def copies(self, i: int, flat: torch.Tensor | None = None, start: int = 0,
               fresh: bool = False, slot: str = "") -> list[torch.Tensor]:
        """One perturbed copy of parameter i (or of its slice `flat` at `start`) per group.

        The copies live in scratch buffers named by `slot`, valid until the next call with the
        same slot; `fresh` allocates new tensors instead."""
        p = self.params[i].data
        w = p if flat is None else flat
        upd_key, upd_coef = None, 0.0
        if i in self.pending:
            if flat is not None or not self.z.fused:
                # a slice (the whole tensor must be updated first), or a perturbation the
                # kernel does not build: the update first, then the copies
                self._apply_pending(i)
            else:  # all but the last queued update now, the last fused into the first copy
                *first, (upd_key, upd_coef) = self.pending.pop(i)
                if first:
                    self.z.add_(i, p, first)

        def alloc(tag: str) -> torch.Tensor:
            return torch.empty_like(w) if fresh else self._buf(slot + tag, w)

        out: list[torch.Tensor] = []
        G, signs, keys = len(self.signs), self.signs, [k[i] for k in self.group_keys]
        g = 0
        while g < G:
            # a +eps/-eps pair of one key (adjacent groups) is written in one pass over w
            pair = g + 1 < G and keys[g + 1] == keys[g] and signs[g + 1] == -signs[g]
            o1 = alloc(str(g))
            o2 = alloc(str(g + 1)) if pair else None
            self.z.perturb_pair(i, w, keys[g], start, signs[g] * self.eps, o1, o2,
                                update_key=upd_key, update_coef=upd_coef)
            upd_key, upd_coef = None, 0.0
            out += [o1] if o2 is None else [o1, o2]
            g += 2 if pair else 1
        return out

    def group_values(self, mod: nn.Module, attr: str) -> list[torch.Tensor | None]:
        """The tensor each group uses for mod.attr: perturbed copies if trainable, else shared."""
        for a, i in self.owners.get(mod, ()):
            if a == attr:
                return self.copies(i, slot=attr)
        return [getattr(mod, attr)] * len(self.signs)

    def head_chunks(self, groups: int) -> Iterator[HeadChunk]:
        """The output head's rows in chunks, perturbed per group when the head is trained."""
        idx = self._head_index()
        bias_idx = self._head_bias_index()
        rows = self._head_rows_index()
        if rows is not None:  # trained rows over a frozen head: each group's offset copy
            deltas = self.copies(rows, fresh=True)
            for v0, v1, ws, bs in loss.PlainHead(self.head.base).chunks(groups):
                yield v0, v1, PatchedGroups(self.head, v0, v1, ws, deltas), bs
            return
        if idx is None and bias_idx is None:  # not trained: read as the plain loss reads it
            yield from loss.PlainHead(self.head).chunks(groups)  # (an int8 head: dequantized)
            return
        w, b = self.head.weight, getattr(self.head, "bias", None)
        if bias_idx is not None:
            bias_groups = self.copies(bias_idx, fresh=True)
        else:
            bias_groups = [b] * groups
        H = w.shape[1]
        # chunks as in the plain loss: at hidden 576, two 4.7 MB scratch copies per chunk
        for v0 in range(0, w.shape[0], loss.VOCAB_CHUNK):
            v1 = min(v0 + loss.VOCAB_CHUNK, w.shape[0])
            if idx is None:
                ws = [w[v0:v1]] * groups
            else:
                ws = self.copies(idx, flat=w.data[v0:v1], start=v0 * H, slot="head")
            bs = [None if bb is None else bb[v0:v1] for bb in bias_groups]
            yield v0, v1, ws, bs

    def head_rows(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Rows `ids` of the output head per group (weight, bias): a classification forward
        needs the label words' rows only, so only those rows of z are generated."""
        G = len(self.signs)
        idx = self._head_index()
        bias_idx = self._head_bias_index()
        rows = self._head_rows_index()
        if rows is not None:  # trained rows over a frozen head: each group's offset copy
            (w,), bs = loss.PlainHead(self.head.base).rows(ids, 1)
            deltas = self.copies(rows, fresh=True)
            return [self.head.patch_rows(ids, w, d) for d in deltas], bs * G
        if idx is None and bias_idx is None:  # not trained: read as the plain loss reads it
            return loss.PlainHead(self.head).rows(ids, G)
        w, b = self.head.weight, getattr(self.head, "bias", None)
        if idx is None:
            ws = [w[ids]] * G
        else:
            if idx in self.pending:
                self._apply_pending(idx)  # rows only: update the whole table first
            ws = []
            for keys, s in zip(self.group_keys, self.signs):
                o = torch.empty(ids.numel(), w.shape[1], dtype=w.dtype)
                self.z.perturb_rows(idx, w.data, ids, keys[idx], s * self.eps, o)
                ws.append(o)
        if bias_idx is not None:
            bs = [c[ids] for c in self.copies(bias_idx, fresh=True)]
        else:
            bs = [None if b is None else b[ids]] * G
        return ws, bs

    def _head_rows_index(self) -> int | None:
        """The trained tensor index of the head's row offset (`head_rows`; None: none)."""
        return next((i for a, i in self.owners.get(self.head, ()) if a == "delta"), None)

    def _head_bias_index(self) -> int | None:
        """The trained tensor index of the head's bias (None: not trained)."""
        return next((i for a, i in self.owners.get(self.head, ()) if a == "bias"), None)

    def _head_index(self) -> int | None:
        if getattr(self.head, "table", None) is not None:
            return None  # a quantized base's int8 head: frozen (its `weight` is a float copy)
        w = self.head.weight
        idx = next((i for a, i in self.owners.get(self.head, ()) if a == "weight"), None)
        if idx is None:
            # the head may still be tied to a trained embedding owned by another module
            idx = next((i for i, p in enumerate(self.params) if p is w), None)
        return idx

    # ---- installing the wrapped forwards ----------------------------------------------------
    @contextmanager
    def active(self, keys: Sequence[int] | Sequence[Sequence[int]], eps: float,
               signs: Sequence[float], rows: int
               ) -> Iterator["PerturbedHead"]:
        """Within the block, the model's rows form len(signs) equal groups; group g sees
        every trainable weight i as w + signs[g] * eps * z(key), key = keys[i] (one key per
        parameter, shared by the groups) or keys[g][i] (one key list per group: P-RGE's
        queries). Yields the head as the losses read it (`PerturbedHead`)."""
        signs = tuple(signs)
        if keys and isinstance(keys[0], (list, tuple)):
            if len(keys) != len(signs):
                raise ValueError(f"{len(keys)} key lists for {len(signs)} groups")
            group_keys = [list(k) for k in keys]
        else:
            group_keys = [list(keys)] * len(signs)
        self.group_keys, self.eps, self.signs, self.rows = group_keys, eps, signs, rows
        wrapped = []
        try:
            for mod in self.owners:
                if mod is self.head:
                    continue  # the head runs through PerturbedHead, inside the loss
                handler = HANDLERS.get(type(mod), generic_forward)
                mod.forward = _bind(handler, self, mod, mod.forward)
                wrapped.append(mod)
            with torch.no_grad():
                yield PerturbedHead(self)
        finally:
            for mod in wrapped:
                del mod.forward  # back to the class's forward
            self.group_keys = []


def _bind(handler, pert: Perturber, mod: nn.Module, orig):
    def forward(*args, **kwargs):
        return handler(pert, mod, orig, *args, **kwargs)
    return forward


def _split_rows(pert: Perturber, t: torch.Tensor) -> list[torch.Tensor]:
    """Split a tensor into the groups' rows; a broadcast batch of 1 is shared by every group.
    A leading dim that is a multiple of the batch is a flattened (batch * seq) layout (OPT's
    MLP): row-major, so its first half still belongs to the first half of the batch."""
    G = len(pert.signs)
    if t.shape[0] % pert.rows == 0:
        return list(t.chunk(G, 0))
    if t.shape[0] == 1:
        return [t] * G
    raise RuntimeError(f"perturbed forward: input with {t.shape[0]} rows, expected "
                       f"{pert.rows} (the batch) or 1")


def _cat_groups(pert: Perturber, outs: list[torch.Tensor]) -> torch.Tensor:
    if len(outs) == 1:
        return outs[0]
    n = pert.rows // len(pert.signs)
    outs = [o.expand(n, *o.shape[1:]) if o.shape[0] == 1 and n != 1 else o for o in outs]
    return torch.cat(outs, 0)


def linear_forward(pert: Perturber, mod: nn.Linear, orig, x: torch.Tensor) -> torch.Tensor:
    ws, bs = pert.group_values(mod, "weight"), pert.group_values(mod, "bias")
    if x.shape[0] % pert.rows:  # a broadcast input: run per group and expand
        return _cat_groups(pert, [F.linear(x, w, b) for w, b in zip(ws, bs)])
    # Each group's matmul writes straight into its rows of the output (no concatenation copy).
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], ws[0].shape[0])
    for xg, og, w, b in zip(x.chunk(len(ws), 0), out.chunk(len(ws), 0), ws, bs):
        x2, o2 = xg.reshape(-1, xg.shape[-1]), og.view(-1, og.shape[-1])
        if b is None:
            torch.mm(x2, w.t(), out=o2)
        else:
            torch.addmm(b, x2, w.t(), out=o2)
    return out


def embedding_forward(pert: Perturber, mod: nn.Embedding, orig, ids: torch.Tensor) -> torch.Tensor:
    i = next(i for a, i in pert.owners[mod] if a == "weight")
    w = pert.params[i].data
    if i in pert.pending:
        pert._apply_pending(i)  # a lookup reads rows only: update the whole table first
    outs = []
    for g, ig in enumerate(_split_rows(pert, ids)):
        flat = ig.reshape(-1)
        o = torch.empty(flat.numel(), w.shape[1], dtype=w.dtype)
        pert.z.perturb_rows(i, w, flat, pert.group_keys[g][i], pert.signs[g] * pert.eps, o)
        outs.append(o.view(*ig.shape, w.shape[1]))
    return _cat_groups(pert, outs)


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    # a frozen factor (LoRA-FA's A) is shared by every group: (1, ...), broadcast, not copied
    if all(v is values[0] for v in values):
        return values[0][None]
    return torch.stack(values)


def lora_forward(pert: Perturber, mod: LoRALinear, orig, x: torch.Tensor) -> torch.Tensor:
    A = _stack(pert.group_values(mod, "lora_A"))
    B = _stack(pert.group_values(mod, "lora_B"))
    if x.shape[0] % pert.rows:
        raise RuntimeError(f"LoRA layer got {x.shape[0]} rows, expected a multiple of {pert.rows}")
    return mod.forward_groups(x, A, B)


def generic_forward(pert: Perturber, mod: nn.Module, orig, *args, **kwargs):
    """Any other module owning trainable tensors (norms, Conv1D, custom embeddings): run its
    own forward once per group with that group's tensors, splitting batch-shaped arguments."""
    G = len(pert.signs)
    own = pert.owners[mod]
    copies = {a: pert.copies(i, fresh=True) for a, i in own}
    saved = {a: mod._parameters[a] for a, _ in own}

    def pick(v, g):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] % pert.rows == 0:
            return v.chunk(G, 0)[g]
        return v

    outs = []
    try:
        for g in range(G):
            for a, _ in own:
                mod._parameters[a] = copies[a][g]  # plain tensors: swapped for this call only
            outs.append(orig(*(pick(a, g) for a in args),
                             **{k: pick(v, g) for k, v in kwargs.items()}))
    finally:
        mod._parameters.update(saved)
    return _cat_groups(pert, outs)


HANDLERS = {nn.Linear: linear_forward, nn.Embedding: embedding_forward,
            LoRALinear: lora_forward}


class PerturbedHead:
    """The output head as each group sees it during `Perturber.active` (the losses'
    `head_view`, like `loss.PlainHead`): all rows in chunks, or just some rows."""

    def __init__(self, pert: Perturber):
        self.pert = pert

    def chunks(self, groups: int) -> Iterator[HeadChunk]:
        return self.pert.head_chunks(groups)

    def rows(self, ids: torch.Tensor, groups: int
             ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        return self.pert.head_rows(ids)
