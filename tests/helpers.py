"""Small shared pieces for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_batch(tok, texts, completions=None, max_seq_length: int = 64) -> dict[str, torch.Tensor]:
    """A padded batch from texts (with completions: loss on the completions only)."""
    from pocketllm.data import collate, encode
    items = []
    for i, t in enumerate(texts):
        rec = {"text": t} if completions is None else {"prompt": t, "completion": completions[i]}
        items.append(encode(rec, tok, mask_prompt=completions is not None,
                            max_seq_length=max_seq_length))
    return collate(items, tok.pad_token_id)


def score(model, batch, groups: int = 1, head_view=None):
    """The batch's `TokenStats` under the objective whose collate made it."""
    from pocketllm.objectives import for_batch
    return for_batch(batch).stats(model, batch, groups, head_view)


TEXTS = ["Maya walks the dog at seven.", "Tea, no sugar, before the morning run.",
         "Dentist on Thursday at 3 pm.", "Budget: rent is due on the first."]


def write_data(d: Path, pairs, valid: int = 2) -> Path:
    """A --data folder `d`: train.jsonl of the (prompt, completion) `pairs`, valid.jsonl of the
    first `valid` of them."""
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in pairs]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "valid.jsonl").write_text("\n".join(lines[:valid]) + "\n")
    return d
