"""Prompt-based classification: label-word logits at the answer position."""

import pytest
import torch
import torch.nn.functional as F

from pocketllm.loss import is_masked_lm
from pocketllm.models import load_model
from pocketllm.objectives import Classification

from ._samples import classification_items, split_head_loss


def tiny_roberta():
    """The tiny masked LM (2-layer RoBERTa, byte tokenizer with <mask>)."""
    return load_model("tiny-roberta")


def _task_batch(model, tok, name, masked):
    items, _ = classification_items(tok, masked, name)
    return Classification().collate(items, tok.pad_token_id)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma",
                                  "tiny-roberta"])
def test_label_word_logits_equal_full_vocabulary_logits(name):
    """The classification forward reads only the label rows at the answer position; the
    figures must be those of the model's own full logits at those indices."""
    model, tok = tiny_roberta() if name == "tiny-roberta" else load_model(name)
    masked = is_masked_lm(model)
    assert masked == (name == "tiny-roberta")
    b = _task_batch(model, tok, "sst2", masked)
    with torch.no_grad():
        s = Classification().stats(model, b)
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    rows = torch.arange(len(b["class_label"]))
    ref = full[rows, b["answer_pos"]].float().gather(1, b["label_ids"])  # (B, C)
    # (gemma's own logits are already soft-capped, as ours are)
    nll = F.cross_entropy(ref, b["class_label"], reduction="none")
    assert torch.allclose(s.nll, nll, atol=1e-5)
    assert torch.equal(s.pred, ref.argmax(1))
    assert torch.equal(s.correct, (ref.argmax(1) == b["class_label"]).float())


def test_collate_adds_per_row_class_answer_position_and_label_words():
    _, tok = load_model("tiny-llama")
    items, task = classification_items(tok)
    b = Classification().collate(items, tok.pad_token_id)
    assert b["class_label"].tolist() == [e % 2 for e in range(len(items))]
    assert b["answer_pos"].tolist() == [len(ids) - 1 for ids, _, _ in items]
    assert b["label_ids"].shape == (len(items), len(task.classes))
    assert (b["labels"] == -100).all()  # no LM loss on a classification batch
    assert Classification().n_classes(b) == len(task.classes)


def test_split_head_loss_over_the_label_words_is_the_loss():
    model, tok = load_model("tiny-llama")
    b = _task_batch(model, tok, "sst2", False)
    obj = Classification()
    with torch.no_grad():
        s = obj.stats(model, b)
    loss = split_head_loss(model, obj, b)
    assert loss == pytest.approx(float(s.nll.mean()), rel=1e-5)
