"""Which weights a run trains (`--trainable`), by name.

    lora    a LoRA adapter injected into the model (--lora-rank, --lora-targets, --lora-layers,
            --lora-fa)
    full    every weight of the model
    norm    the normalisation layers' scales and biases only (tens of thousands of numbers)
    prefix  prompt tuning: --num-virtual-tokens learned embeddings before every input
    head    offsets to the output head's rows of the answer tokens (--head-tokens; default:
            the tokens the training data scores): a linear probe on the frozen model

A zeroth-order estimate's variance grows with the number of coordinates it perturbs, so the
small sets (head, norm, prefix, LoRA at rank 1-2 or LoRA-FA on few layers) are the ones it trains
best. A set is one function in `TRAINABLE`: (model, run settings) -> (spec or None,
[(name, parameter)]). A spec (None: `full`, saved as a whole model) saves its set beside the
run and rebuilds it on a fresh model: `spec.save(model, dir, base_model, metadata)`,
`Spec.load(model, dir) -> spec`, `spec.merge(model)` (fuse); `SAVED` lists them by kind, and
`load_saved(model, dir)` loads whichever kind a directory holds (pocketllm.adapter: the format).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from . import adapter
from .lora import (LoraSpec, apply_lora, default_targets, layer_of, lora_parameters, pick_layers,
                   select_layers)
from .loss import decoder_layers
from .head_rows import HeadSpec, add_rows_head, parse_ids, target_tokens
from .prompt import PromptSpec, add_virtual_tokens


def lora(model, args):
    """A LoRA adapter (--lora-rank, --lora-targets, --lora-layers, --lora-fa); its spec saves
    and loads it (LoRA-FA's frozen A is saved with B: the adapter loads as trained)."""
    targets = list(args.lora_targets) or default_targets(model)
    try:
        layers = select_layers(model, targets, getattr(args, "lora_layers", ""))
        spec = LoraSpec(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=targets, layers=layers)
        # seeded: a resumed run must rebuild the same initial adapter
        torch.manual_seed(args.seed)
        apply_lora(model, spec)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return spec, lora_parameters(model, fa=args.lora_fa)


def full(model, args):
    """Every weight of the model (saved as the whole model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return None, list(model.named_parameters())


# ---- norm: the normalisation layers ------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm / RMSNorm / GroupNorm, or a model's own
    (LlamaRMSNorm, GemmaRMSNorm, ...: by the name transformers gives them)."""
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm))
            or type(module).__name__.endswith("Norm"))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every normalisation layer with weights, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if is_norm(m) and next(m.parameters(recurse=False), None) is not None]


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every normalisation layer's own scale and bias, in model order."""
    return [(f"{m_name}.{a}" if m_name else a, p) for m_name, m in norm_layers(model)
            for a, p in m.named_parameters(recurse=False)]


@dataclass
class NormSpec:
    """The normalisation layers' scales and biases; saved under the model's own names."""

    kind: ClassVar[str] = "norm"
    peft_type: ClassVar[str | None] = None  # PEFT's LN tuning stores copies, not this

    def save(self, model: nn.Module, path: str | os.PathLike, base_model: str,
             metadata: dict[str, str] | None = None) -> Path:
        weights = {n: p.detach().contiguous().clone() for n, p in norm_parameters(model)}
        config = {adapter.KIND_KEY: self.kind, "base_model_name_or_path": base_model,
                  "tensors": len(weights)}
        return adapter.write(path, weights, config, metadata)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike) -> "NormSpec":
        adapter.load_into(path, dict(norm_parameters(model)))
        return cls()

    def merge(self, model: nn.Module) -> int:
        """Nothing to fold: the loaded scales are the model's own. The layers they are."""
        return len(norm_layers(model))


def final_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the normalisation layers that read the last decoder layer's output:
    the norms beside the layer list (llama's `model.norm`, gpt2's `ln_f`, opt's
    `final_layer_norm`). An embedding's norm (BERT's) sits elsewhere and is not one."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if any(child is layers for child in mod.children()):
            return [(f"{name}.{n}" if name else n, c) for n, c in mod.named_children()
                    if is_norm(c)]
    return []


def select_norms(model: nn.Module, params: list[tuple[str, nn.Parameter]], text: str
                 ) -> list[tuple[str, nn.Parameter]]:
    """The norm tensors `--norm-layers text` keeps: the final norm's and those of the layers
    it names (`lora.pick_layers`; "0": the final norm alone). Empty text: all of `params`.
    A ValueError says what is wrong."""
    text = str(text).strip()
    if not text:
        return params
    have = sorted({i for i in (layer_of(n) for n, _ in params) if i is not None})
    after = tuple(f"{n}." for n, _ in final_norms(model))
    if not have or not after:
        raise ValueError(f"--norm-layers {text}: this model has no "
                         f"{'numbered layer norms' if not have else 'final norm'}")
    chosen = set(pick_layers(text, have, "--norm-layers", "norm", least=0))
    return [(n, p) for n, p in params
            if n.startswith(after) or layer_of(n) in chosen]


def norm(model, args):
    """The normalisation layers' scales (and biases, where they have them); with
    --norm-layers, the final norm's and those of the layers it names only (a zeroth-order
    estimate's variance grows with the coordinates it perturbs)."""
    params = norm_parameters(model)
    if not params:
        raise SystemExit(f"--trainable norm: {args.model} has no normalisation layer with "
                         "weights")
    try:
        params = select_norms(model, params, getattr(args, "norm_layers", ""))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return NormSpec(), params


# ---- prefix: prompt tuning ---------------------------------------------------------------
def prefix(model, args):
    """--num-virtual-tokens learned input embeddings (prompt tuning, pocketllm/prompt.py)."""
    vt = add_virtual_tokens(model, args.num_virtual_tokens, seed=args.seed)
    name = next(n for n, p in model.named_parameters() if p is vt.embeddings)
    return PromptSpec(num_virtual_tokens=vt.n), [(name, vt.embeddings)]


# ---- head: offsets to the answer tokens' rows of the output head ---------------------------
def head(model, args):
    """Offsets to the output head's rows --head-tokens (default: the tokens the training data
    scores, `complete`): a linear probe on the frozen model (pocketllm/head_rows.py)."""
    try:
        ids = parse_ids(getattr(args, "head_tokens", ""))
        if not ids:
            raise ValueError("--trainable head: no rows to train: give --head-tokens (token ids)")
        rows = add_rows_head(model, ids)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    rows.delta.requires_grad_(True)
    name = next(n for n, p in model.named_parameters() if p is rows.delta)
    return HeadSpec(token_ids=ids), [(name, rows.delta)]


def _head_from_data(args, items) -> None:
    if not str(getattr(args, "head_tokens", "")).strip():
        args.head_tokens = ",".join(str(t) for t in target_tokens(items))


TRAINABLE = {"lora": lora, "full": full, "norm": norm, "prefix": prefix, "head": head}
# the saved form of each set but `full`: its spec class, by kind
SAVED = {cls.kind: cls for cls in (LoraSpec, NormSpec, PromptSpec, HeadSpec)}
# settings a set takes from the training data when the run does not give them
FROM_DATA = {"head": _head_from_data}


def complete(args, items) -> None:
    """Fill in `args` what its trainable set takes from the training split's encoded `items`
    when not given (`--trainable head`: the rows it scores), before the run's config is saved:
    a resumed or replayed run rebuilds the same set from the config alone."""
    fill = FROM_DATA.get(args.trainable)
    if fill is not None:
        fill(args, items)


def setup_trainable(model, args):
    """The trainable set `args.trainable` on `model`: (spec or None, [(name, parameter)])."""
    if args.trainable not in TRAINABLE:
        raise SystemExit(f"--trainable {args.trainable!r}: choose one of {', '.join(TRAINABLE)}")
    return TRAINABLE[args.trainable](model, args)


def saved_kind(path: str | os.PathLike) -> str:
    """The kind of trainable set saved in directory `path` (its config names it)."""
    cfg = adapter.read_config(path)
    kind = cfg.get(adapter.KIND_KEY)
    if kind is None:  # PEFT's own config (no peft_type: an old LoRA config)
        by_peft = {cls.peft_type: k for k, cls in SAVED.items() if cls.peft_type}
        kind = by_peft.get(cfg.get("peft_type", "LORA"))
        if kind is None:
            raise ValueError(f"{Path(path) / adapter.ADAPTER_CONFIG}: peft_type "
                             f"{cfg.get('peft_type')!r} is none of "
                             f"{', '.join(sorted(by_peft))}")
    if kind not in SAVED:
        raise ValueError(f"{Path(path) / adapter.ADAPTER_CONFIG}: {adapter.KIND_KEY} {kind!r} "
                         f"is none of {', '.join(SAVED)}")
    return kind


def load_saved(model: nn.Module, path: str | os.PathLike):
    """Rebuild on `model` the trainable set saved in `path`, whichever kind; its spec."""
    return SAVED[saved_kind(path)].load(model, path)
