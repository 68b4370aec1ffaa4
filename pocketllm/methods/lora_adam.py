"""lora-adam: first-order LoRA with AdamW, the baseline zeroth-order methods are compared with.

Backprop through the frozen base keeps every layer's activations for the backward pass and adds
gradients and two Adam moments for the adapter: this is the memory the ZO methods avoid.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loss import token_stats
from .base import Method, StepResult, register

CKPT = "checkpoint.pt"


@register("lora-adam")
class LoRAAdam(Method):
    # the usual LoRA fine-tuning rate (PEFT / LoRA paper range 1e-4..5e-4), measured on SST-2
    # (benchmarks/results/sst2.md)
    defaults = {"lora": {"learning_rate": 1e-4, "eps": 1e-2}}
    trainable_kinds = ("lora",)

    def __init__(self, model, params, args):
        super().__init__(model, params, args)
        for _, p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW([p for _, p in params], lr=args.learning_rate,
                                     weight_decay=args.weight_decay)

    def step(self, batches, step, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_sum = 0.0
        # The model stays in eval mode: no dropout in the frozen base, as in MeZO's setups,
        # which also keeps a resumed run identical to an uninterrupted one.
        for b in batches:
            stats = token_stats(self.model, b)
            # token-weighted over all micro-batches, as if they were one batch
            loss = stats.nll.sum() / max(total, 1)
            loss.backward()
            loss_sum += loss.item()
        self.opt.step()
        return StepResult(loss=loss_sum, tokens=total, forward_passes=len(batches))

    def save_state(self, out_dir: Path, step: int) -> None:
        state = {"step": step, "optimizer": self.opt.state_dict(),
                 "params": {n: p.detach().clone() for n, p in self.params}}
        tmp = Path(out_dir) / (CKPT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, Path(out_dir) / CKPT)

    def restore(self, out_dir: Path) -> int:
        path = Path(out_dir) / CKPT
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True)
        names = [n for n, _ in self.params]
        if sorted(state["params"]) != sorted(names):
            raise SystemExit(f"--resume: {path} holds other parameters than this run trains")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["params"][n])
        self.opt.load_state_dict(state["optimizer"])
        return int(state["step"])
