"""Text generation with a (possibly adapted) model."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tok, prompt: str, max_tokens: int = 64, temp: float = 0.0,
             chat: bool = False, seed: int = 0) -> str:
    """Greedy (temp 0) or sampled continuation of `prompt`, without the prompt."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt")
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temp} if temp > 0 else {"do_sample": False}
    out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
