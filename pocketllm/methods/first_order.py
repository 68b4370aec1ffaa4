"""Shared by the first-order (backprop + AdamW) methods: the step with gradient accumulation
and the atomic, resumable checkpoint. Subclasses only say which weights they train."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dataclasses import dataclass

from ..config import opt
from ..memory_estimate import Backprop
from .base import Method, StepResult

CKPT = "checkpoint.pt"


@dataclass
class AdamWConfig:
    weight_decay: float = opt(0.0, "AdamW weight decay (lora-adam, adam, side)")


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
        return Backprop()

    def step(self, batches, step, lr, eps=None):
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = sum(self.objective.n_scored(b) for b in batches)
        loss_sum = 0.0
        # The model stays in eval mode: no dropout, as in MeZO's setups.
        for b in batches:
            stats = self.objective.stats(self.model, b)
            # token-weighted over all micro-batches, as if they were one batch
            loss = stats.nll.sum() / max(total, 1)
            loss.backward()
            loss_sum += loss.item()
        self.opt.step()
        return StepResult(loss=loss_sum, tokens=total, forward_passes=len(batches))

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
