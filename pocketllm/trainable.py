"""Which weights a run trains (`--trainable`): a LoRA adapter injected into the model, or every
weight of it."""

from __future__ import annotations

import torch

from .lora import LoraSpec, apply_lora, default_targets, lora_parameters


def setup_trainable(model, args):
    """Inject LoRA if asked; return (spec or None, [(name, parameter)] to train)."""
    if args.trainable == "lora":
        # seeded: a resumed run must rebuild the same initial adapter
        torch.manual_seed(args.seed)
        spec = LoraSpec(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=list(args.lora_targets) or default_targets(model))
        apply_lora(model, spec)
        return spec, lora_parameters(model, fa=args.lora_fa)
    for p in model.parameters():
        p.requires_grad_(False)
    return None, list(model.named_parameters())
