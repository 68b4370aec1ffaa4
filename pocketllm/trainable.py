"""Which weights a run trains (`--trainable`), by name: a LoRA adapter injected into the model,
or every weight of it. A new trainable set is one function and one line in `TRAINABLE`."""

from __future__ import annotations

import torch

from .lora import LoraSpec, apply_lora, default_targets, lora_parameters


def lora(model, args):
    """A LoRA adapter (--lora-rank, --lora-targets, --lora-fa); its spec saves and loads it."""
    # seeded: a resumed run must rebuild the same initial adapter
    torch.manual_seed(args.seed)
    spec = LoraSpec(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    targets=list(args.lora_targets) or default_targets(model))
    apply_lora(model, spec)
    return spec, lora_parameters(model, fa=args.lora_fa)


def full(model, args):
    """Every weight of the model (saved as the whole model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return None, list(model.named_parameters())


TRAINABLE = {"lora": lora, "full": full}


def setup_trainable(model, args):
    """The trainable set `args.trainable` on `model`: (LoRA spec or None, [(name, parameter)])."""
    if args.trainable not in TRAINABLE:
        raise SystemExit(f"--trainable {args.trainable!r}: choose one of {', '.join(TRAINABLE)}")
    return TRAINABLE[args.trainable](model, args)
