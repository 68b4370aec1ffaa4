"""Multiple choice: the cross-entropy of the candidates' mean log-likelihoods."""

import pytest
import torch
import torch.nn.functional as F

from pocketllm.models import load_model
from pocketllm.objectives import LanguageModeling, MultipleChoice

from ._samples import choice_items


def test_choice_loss_is_cross_entropy_of_mean_candidate_loglik():
    model, tok = load_model("tiny-llama")
    items, _ = choice_items(tok)  # two examples, right answers 1 and 0
    b = MultipleChoice().collate(items, tok.pad_token_id)
    with torch.no_grad():
        s = MultipleChoice().stats(model, b)
        lm = LanguageModeling().stats(model, {k: b[k] for k in ("input_ids", "attention_mask",
                                                                 "labels")})
    score = (-lm.nll / lm.tokens).view(2, 2)
    assert torch.allclose(s.nll, F.cross_entropy(score, torch.tensor([1, 0]), reduction="none"))
    assert s.nll.shape == (2,) and torch.equal(s.pred, score.argmax(1))


def test_collate_expands_each_example_into_its_candidate_rows():
    _, tok = load_model("tiny-llama")
    items, _ = choice_items(tok)
    b = MultipleChoice().collate(items, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and b["choice_label"].tolist() == [0, 1, 1, 0]
    assert ((b["labels"] != -100).sum(1) > 0).all()  # every candidate has tokens scored
    assert MultipleChoice().gold(b).tolist() == [1, 0]
    assert MultipleChoice().n_scored(b) == 2 and MultipleChoice().n_classes(b) == 2
    bad = [items[0], (items[1][0], items[1][1], {**items[1][2],
                                                 "candidates": items[1][2]["candidates"][:1]})]
    with pytest.raises(ValueError, match="same number of candidates"):
        MultipleChoice().collate(bad, tok.pad_token_id)
