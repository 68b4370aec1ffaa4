"""Encoded items of each objective, built the way a run builds them (`RunData.encode`)."""

from __future__ import annotations

import torch

from pocketllm.data import encode
from pocketllm.loss import backbone
from pocketllm.data.tasks import TASKS, Example, encode_examples
from tests.helpers import TEXTS

COPA = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
        "choice2": "Water flowed.", "question": "effect"}


def lm_items(tok):
    """Completions (loss on the completion) and one plain text (loss on every token)."""
    recs = [{"prompt": "Category of 'ran 5k':", "completion": " health"},
            {"prompt": "Category of 'paid rent':", "completion": " money"},
            {"text": TEXTS[0]}]
    return [encode(r, tok, mask_prompt=True, max_seq_length=64) for r in recs], None


def classification_items(tok, masked: bool = False, name: str = "sst2"):
    task = TASKS[name]  # (a task whose one text field is "sentence")
    exs = [Example({"sentence": s}, i % 2) for i, s in enumerate(TEXTS)]
    return encode_examples(exs, task, tok, masked, 64), task


def choice_items(tok):
    task = TASKS["copa"]
    return encode_examples([Example(COPA, 1), Example(COPA, 0)], task, tok, False), task


# objective name -> (tok -> (items, task)); a new objective adds its own line (the conformance
# test fails until it does)
SAMPLES = {"lm": lm_items, "classification": classification_items, "choice": choice_items}


def split_head_loss(model, objective, batch) -> float:
    """The loss split mode computes from what the device sends: the objective's scored rows and
    targets through `split.side.head_loss_grad`."""
    from pocketllm.split.side import head_loss_grad
    head = model.get_output_embeddings()
    with torch.no_grad():
        rows = objective.scored_rows(backbone(model, batch), batch)
        targets, candidates = objective.batch_targets(batch)
        return head_loss_grad(rows, targets, head.weight, head.bias, candidates)[0]
