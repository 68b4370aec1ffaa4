import pytest
import torch
import torch.nn.functional as F

from pocketllm.loss import group_losses, token_stats
from pocketllm.models import load_model
from tests.helpers import TEXTS, tiny_batch


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_chunked_loss_equals_full_logits(name, monkeypatch):
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)  # several chunks over the tiny vocabulary (260)
    model, tok = load_model(name)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        s = token_stats(model, b)
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
    s = token_stats(model, b)
    n_completion = [len(tok(" health").input_ids), len(tok(" money").input_ids)]
    # each completion's tokens plus the end-of-sequence token are scored, nothing else
    assert s.tokens.tolist() == [n + 1 for n in n_completion]


def test_gradients_flow_through_chunks():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS[:2])
    w = model.get_output_embeddings().weight
    w.requires_grad_(True)
    token_stats(model, b).nll.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
