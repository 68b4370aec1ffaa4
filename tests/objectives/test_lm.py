"""Language modelling: the streamed causal-LM loss against the model's own logits."""

import pytest
import torch
import torch.nn.functional as F

from pocketllm.loss import group_losses
from pocketllm.models import load_model
from pocketllm.objectives import LanguageModeling, label_choices
from tests.helpers import TEXTS, tiny_batch

from ._samples import split_head_loss


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_chunked_loss_equals_full_logits(name, monkeypatch):
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)  # several chunks over the tiny vocabulary (260)
    model, tok = load_model(name)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        s = LanguageModeling().stats(model, b)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lg, tg = logits[:, :-1].float(), b["labels"][:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100,
                          reduction="none").view(tg.shape)
    mask = tg != -100
    assert torch.allclose(s.nll, (nll * mask).sum(1), atol=1e-4, rtol=1e-5)
    assert torch.equal(s.tokens, mask.sum(1).float())
    argmax_ok = ((lg.argmax(-1) == tg) & mask).sum(1).float()
    assert torch.equal(s.correct, argmax_ok)
    ref = (nll * mask).sum() / mask.sum()
    assert group_losses(s, 1).item() == pytest.approx(ref.item(), rel=1e-5)


def test_prompt_masked_positions_are_not_scored():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, ["Category of 'ran 5k':", "Category of 'paid rent':"], [" health", " money"])
    s = LanguageModeling().stats(model, b)
    n_completion = [len(tok(" health").input_ids), len(tok(" money").input_ids)]
    # each completion's tokens plus the end-of-sequence token are scored, nothing else
    assert s.tokens.tolist() == [n + 1 for n in n_completion]


def test_closed_label_set_accuracy_is_the_first_label_token_ranked_among_the_choices():
    model, tok = load_model("tiny-llama")
    records = [{"prompt": "Category of 'ran 5k': ", "completion": "health"},
               {"prompt": "Category of 'paid rent': ", "completion": "money"}]
    choices = label_choices(records, tok)
    assert choices.tolist() == sorted(tok(c, add_special_tokens=False).input_ids[0]
                                      for c in ("health", "money"))
    b = tiny_batch(tok, [r["prompt"] for r in records], [r["completion"] for r in records])
    with torch.no_grad():
        s = LanguageModeling(choices).stats(model, b)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    first = (b["labels"][:, 1:] != -100).float().argmax(1)       # first label position - 1
    rows = torch.arange(2)
    pred = choices[logits[rows, first][:, choices].argmax(1)]
    assert torch.equal(s.choice_correct, (pred == b["labels"][rows, first + 1]).float())
    assert LanguageModeling(choices).accuracy and not LanguageModeling().accuracy
    assert label_choices([{"text": "free text"}], tok) is None
    assert label_choices(records[:1], tok) is None  # one label is no label set


def test_split_head_loss_on_the_scored_rows_is_the_loss():
    """What split mode sends (scored rows, targets) and the head gradient it computes give
    the objective's own loss."""
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS)
    obj = LanguageModeling()
    with torch.no_grad():
        s = obj.stats(model, b)
    loss = split_head_loss(model, obj, b)
    assert loss == pytest.approx(group_losses(s, 1).item(), rel=1e-5)
