"""Prompt tuning (`--trainable prefix`): N learned virtual-token embeddings prepended to every
input, the rest of the model frozen (Lester et al. 2021, "The Power of Scale for Parameter-
Efficient Prompt Tuning"; MeZO, arXiv 2305.17333, tunes a few prefix tokens the same way).

Why this and not per-layer key/value prefixes (Li & Liang 2021): it is N x hidden numbers (8 x
576 on SmolLM2-135M), the fewest of any trainable set, which is what a zeroth-order estimate
wants (its variance grows with the coordinates it perturbs); and it needs nothing of an
architecture but its input embeddings, so it is the same code for llama, gpt2, opt, gemma and
roberta. The saved adapter is PEFT's prompt-tuning format (peft_type PROMPT_TUNING, the tensor
`prompt_embeddings`), which peft loads.

How it is wired: `VirtualTokens` is a child module of the model's backbone (`model.base_model`),
with two hooks on the backbone. Before its forward, the inputs are embedded and the virtual
tokens prepended (the attention mask gains N ones, explicit position ids shift by N); after it,
the N virtual positions are cut from the hidden states. So every objective sees hidden states of
exactly its batch's length, position t still the t-th real token: the virtual tokens are never
scored, and no objective knows they exist. The prepending is `VirtualTokens.forward` itself,
(rows, T, H) -> (rows, N + T, H), so the zeroth-order Perturber (which gives each replica of a
repeated batch its own perturbed copy of the tensors a module owns, `zo.perturb.generic_forward`)
gives each replica its own prefix. In generation, a step whose cache already holds the prompt
prepends nothing: the virtual tokens are in the cache.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from . import adapter

WEIGHT_KEY = "prompt_embeddings"  # PEFT's name for the tensor


class VirtualTokens(nn.Module):
    """N learned input embeddings, float32 (tiny, and small zeroth-order updates do not round
    away); `forward` prepends them to a batch of token embeddings."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().to(torch.float32).clone())
        self._prepended = False  # whether the backbone's running forward got them

    @property
    def n(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, T, H) token embeddings -> (rows, N + T, H)."""
        v = self.embeddings.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([v, x], dim=1)

    # ---- the backbone's hooks -----------------------------------------------------------
    def before(self, base: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the backbone: its inputs with the virtual tokens in front."""
        sig = inspect.signature(base.forward)
        kw = dict(sig.bind_partial(*args, **kwargs).arguments)  # every argument by name
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                kw.update(kw.pop(p.name, {}))
        n = self.n
        cache = kw.get("cache", kw.get("past_key_values"))
        # generating with a cache that holds the prompt already: nothing to prepend
        cached = bool(cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache)
        self._prepended = not cached
        if not cached:
            embeds = kw.get("inputs_embeds")
            if embeds is None:
                embeds = base.get_input_embeddings()(kw["input_ids"])
            kw["input_ids"], kw["inputs_embeds"] = None, self(embeds)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prompt tuning: a {mask.dim()}-D attention mask; only a "
                                 "(batch, tokens) mask can be extended by the virtual tokens")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        pos = kw.get("position_ids")
        if pos is not None:  # the real tokens come after the virtual ones
            head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], -1)
            kw["position_ids"] = pos + n if cached else torch.cat([head, pos + n], dim=1)
        types = kw.get("token_type_ids")
        if types is not None and not cached:
            kw["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
        return (), kw

    def after(self, base: nn.Module, args: tuple, kwargs: dict, out):
        """Forward hook of the backbone: the virtual positions cut from its hidden states."""
        if not self._prepended:
            return out
        self._prepended = False
        n = self.n
        if isinstance(out, tuple):
            return (out[0][:, n:], *out[1:])
        out["last_hidden_state"] = out.last_hidden_state[:, n:]
        if getattr(out, "hidden_states", None) is not None:
            out["hidden_states"] = tuple(h[:, n:] for h in out.hidden_states)
        return out


def virtual_tokens(model: nn.Module) -> VirtualTokens | None:
    """The model's virtual tokens, if it has them."""
    return getattr(model.base_model, "virtual_tokens", None)


def add_virtual_tokens(model: nn.Module, n: int, seed: int = 0) -> VirtualTokens:
    """Give `model` N virtual tokens, initialised as the embeddings of N tokens drawn from its
    vocabulary with `seed` (Lester et al.: better than random vectors; and a rebuilt run, a
    resumed or replayed one, gets the same start). Freezes everything else."""
    if n < 1:
        raise SystemExit(f"--num-virtual-tokens must be at least 1, got {n}")
    if virtual_tokens(model) is not None:
        raise ValueError("the model already has virtual tokens")
    base, emb = model.base_model, model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, emb.num_embeddings, (n,), generator=g)  # (an int8 table too)
    with torch.no_grad():
        init = emb(ids)  # what the backbone takes as inputs_embeds (Gemma 3's are scaled)
    for p in model.parameters():
        p.requires_grad_(False)
    vt = VirtualTokens(init).to(init.device)
    base.add_module("virtual_tokens", vt)
    base.register_forward_pre_hook(vt.before, with_kwargs=True)
    base.register_forward_hook(vt.after, with_kwargs=True)
    return vt


@dataclass
class PromptSpec:
    """Prompt tuning of `num_virtual_tokens` tokens; saved in PEFT's PROMPT_TUNING format."""

    num_virtual_tokens: int = 8

    kind: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    # `export` writes a model that reads token ids: it has no input for these
    export_refused: ClassVar[str] = ("a prompt-tuning prefix cannot be merged into the "
                                     "weights; export supports LoRA, norm and head")

    def save(self, model: nn.Module, path: str | os.PathLike, base_model: str,
             metadata: dict[str, str] | None = None) -> Path:
        vt = virtual_tokens(model)
        cfg = model.config
        config = {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model, "inference_mode": True,
            "num_virtual_tokens": vt.n, "token_dim": vt.embeddings.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None),
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
        }
        weights = {WEIGHT_KEY: vt.embeddings.detach().contiguous().clone()}
        return adapter.write(path, weights, config, metadata)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike) -> "PromptSpec":
        """Add the virtual tokens saved at `path` to `model` (if it has none yet) and load them."""
        cfg = adapter.read_config(path)
        spec = cls(num_virtual_tokens=int(cfg["num_virtual_tokens"]))
        vt = virtual_tokens(model) or add_virtual_tokens(model, spec.num_virtual_tokens)
        adapter.load_into(path, {WEIGHT_KEY: vt.embeddings})
        return spec

    def merge(self, model: nn.Module) -> int:
        raise SystemExit("prompt tuning's virtual tokens are inputs, not weights: they cannot be "
                         "merged into the model (use the adapter with eval/generate "
                         "--adapter-path)")
