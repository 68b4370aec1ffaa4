"""Shared by the first-order (backprop + AdamW) methods: the step with gradient accumulation,
activation checkpointing, and the atomic, resumable checkpoint. Subclasses only say which
weights they train."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import opt
from ..finite import NonFiniteError
from ..loss import decoder_layers, recomputed_head
from ..memory_estimate import Backprop
from .base import Method, StepResult

CKPT = "checkpoint.pt"


@dataclass
class AdamWConfig:
    weight_decay: float = opt(0.0, "AdamW weight decay (lora-adam, adam, side)", ge=0)
    activation_checkpointing: bool = opt(
        False, "keep only each layer's input for the backward pass, rebuilding the layer "
        "there, and no logits of the streamed head loss (MeBP): lora-adam's peak 1.2x "
        "inference's instead of 2x, for 1.3x the step time (lora-adam, adam)")


class _Inputs:
    """The layers' kept inputs, in one block per forward (layers x hidden states). Left where
    the layers allocated them, each would sit between the temporaries of the layer that made
    it, and the heap could not hand those holes to the next layer's larger temporaries."""

    def __init__(self, n: int):
        self.n, self.block = n, None

    def keep(self, i: int, h: torch.Tensor) -> None:
        """Move `h`, layer i's input, into the block: `.data` swaps its storage only (the
        tensor keeps its values, autograd history and version counter), and its old storage is
        freed when the layer before lets go of it."""
        if i == 0:  # a new forward
            self.block = h.new_empty((self.n, *h.shape))
        slot = self.block[i]
        with torch.no_grad():
            slot.copy_(h)
        h.data = slot


def _needs_grad(*values) -> bool:
    """Whether a tensor among `values` (or in a tuple among them) requires a gradient."""
    return any(_needs_grad(*v) if isinstance(v, (tuple, list)) else
               isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _checkpointed_forward(forward, inputs: _Inputs, i: int, h, *args, **kwargs):
    """Layer i's `forward` on hidden states `h`, keeping only `h` for the backward."""
    if not torch.is_grad_enabled() or _needs_grad(*args, *kwargs.values()):
        # evaluation, generation: the layer as it is; an input besides the hidden states that
        # needs a gradient (none in the architectures here) would not get it in a checkpoint
        return forward(h, *args, **kwargs)
    inputs.keep(i, h)
    if not h.requires_grad:  # a frozen first layer's input: the checkpoint needs one that does
        h = h.detach().requires_grad_()
    # Reentrant: the forward runs without autograd, so no graph node is left between the
    # layer's temporaries (non-reentrant checkpointing keeps every op's node, small blocks that
    # split the heap's free space: 30-50 MB more peak RSS on smollm2-135m at 8 x 64). It takes
    # tensors positionally (transformers passes the hidden states so, for this reason); the
    # keyword arguments (masks, rotary tables, none needing a gradient) go in the closure.
    return checkpoint(lambda x, *a: forward(x, *a, **kwargs), h, *args, use_reentrant=True)


@contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Within the block, autograd keeps only each decoder layer's inputs: the layer runs again
    in the backward pass to rebuild what it saved, one layer at a time; and the streamed head
    loss saves no chunk's logits (`loss.recomputed_head`). Gradients are those of the plain
    pass up to rounding. Our own wrapping rather than transformers' gradient checkpointing,
    which runs only in train mode (dropout on; these methods train in eval mode)."""
    layers = list(decoder_layers(model))
    inputs = _Inputs(len(layers))
    for i, layer in enumerate(layers):  # an instance attribute: nn.Module.__call__ calls it
        layer.forward = functools.partial(_checkpointed_forward, layer.forward, inputs, i)
    try:
        with recomputed_head():
            yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


class FirstOrderAdamW(Method):
    """AdamW on `params` by backprop through the objective's loss; no dropout (eval mode), so
    a resumed run is bit-for-bit identical to an uninterrupted one."""

    Config = AdamWConfig

    def __init__(self, model, params, cfg, run, objective):
        super().__init__(model, params, cfg, run, objective)
        for _, p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW([p for _, p in params], lr=run.learning_rate,
                                     weight_decay=cfg.weight_decay)

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """Backprop through the model, AdamW on the trainable weights."""
        return Backprop(checkpointed=cfg.activation_checkpointing)

    def step(self, batches, step, lr, eps=None):
        for group in self.opt.param_groups:
            group["lr"] = lr
        # Checkpointed, the gradients stay allocated from step to step (zeroed, then
        # accumulated into in place, the same figures): new ones would be allocated between
        # the backward's temporaries and split the heap's free space there.
        self.opt.zero_grad(set_to_none=not self.cfg.activation_checkpointing)
        total = sum(self.objective.n_scored(b) for b in batches)
        loss_sum = 0.0
        lean = checkpointed(self.model) if self.cfg.activation_checkpointing else nullcontext()
        # The model stays in eval mode: no dropout, as in MeZO's setups.
        with lean:
            for b in batches:
                stats = self.objective.stats(self.model, b)
                # token-weighted over all micro-batches, as if they were one batch
                loss = stats.nll.sum() / max(total, 1)
                loss.backward()
                loss_sum += loss.item()
        try:
            self.opt.step()
        except RuntimeError as e:
            # torch casts AdamW's scalars (lr / (1 - beta1^t), lr x weight decay) to the
            # weights' dtype: a rate beyond its range fails there, before any non-finite value
            # could be written
            if "overflow" not in str(e):
                raise
            raise NonFiniteError(step + 1, f"AdamW's update at learning rate {lr:g} overflows "
                                 f"the weights' dtype") from None
        return StepResult(loss=loss_sum, tokens=total, forward_passes=len(batches))

    def saved_tensors(self):
        # AdamW's moments too: a gradient of 1e20 squares to inf in exp_avg_sq while the
        # update it divides stays finite
        return super().saved_tensors() + [
            (f"AdamW {k} of {n}", v) for n, p in self.params
            for k, v in self.opt.state.get(p, {}).items() if torch.is_tensor(v)]

    def save_state(self, out_dir: Path, step: int, final: bool = False) -> None:
        # detach(), not clone(): torch.save serialises the storage as it is, so saving a
        # full model does not hold a second copy of its weights in memory.
        state = {"step": step, "optimizer": self.opt.state_dict(),
                 "params": {n: p.detach() for n, p in self.params}}
        # written to a temporary file, fsynced, then renamed: a kill at any moment leaves
        # either the previous checkpoint or this one, never a torn file
        tmp = Path(out_dir) / (CKPT + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(out_dir) / CKPT)

    def restore(self, out_dir: Path) -> int:
        path = Path(out_dir) / CKPT
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True)
        names = [n for n, _ in self.params]
        if sorted(state["params"]) != sorted(names):
            raise SystemExit(f"--resume: {path} holds other parameters than this run trains "
                             f"(method {self.name}, --trainable {self.run.trainable})")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["params"][n])
        self.opt.load_state_dict(state["optimizer"])
        return int(state["step"])
