"""The streamed head pass (`loss.stream_head`) and the entry points kept on `pocketllm.loss`.

What each objective scores is tested in tests/objectives/."""

import pytest
import torch

from pocketllm.loss import PlainHead, stream_head
from pocketllm.models import load_model
from pocketllm.objectives import LanguageModeling
from tests.helpers import TEXTS, tiny_batch



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_chunk_buffers_match_the_autograd_path(dtype, monkeypatch):
    # without autograd the chunk loop reuses two buffers and exponentiates in place; with it,
    # fresh tensors. Same figures, per group, with a short last chunk (260 = 2 x 100 + 60).
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)
    model, tok = load_model("tiny-gemma", dtype=dtype)
    b = tiny_batch(tok, TEXTS[:2] * 2)
    with torch.no_grad():
        fast = LanguageModeling().stats(model, b, groups=2)
    with torch.enable_grad():
        ref = LanguageModeling().stats(model, b, groups=2)
    for a, r in ((fast.nll, ref.nll), (fast.tokens, ref.tokens), (fast.correct, ref.correct)):
        assert torch.equal(a, r.detach())


def test_gradients_flow_through_chunks():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS[:2])
    w = model.get_output_embeddings().weight
    w.requires_grad_(True)
    LanguageModeling().stats(model, b).nll.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("grad", [False, True])
def test_stream_head_equals_full_logits_per_group(grad, monkeypatch):
    """Each group reads its own weights; the figures are those of full (N, vocab) logits, and
    `mean_row` is the cross-entropy's gradient plus the target's row."""
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 300)  # 1000 = 3 x 300 + 100
    torch.manual_seed(0)
    ws, b = [torch.randn(1000, 8), torch.randn(1000, 8)], torch.randn(1000)
    h, t = torch.randn(6, 8), torch.randint(0, 1000, (6,))
    group_of = torch.tensor([0, 1, 0, 1, 1, 0])

    def chunks(groups):
        for v0 in range(0, 1000, L.VOCAB_CHUNK):
            v1 = min(v0 + L.VOCAB_CHUNK, 1000)
            yield v0, v1, [w[v0:v1] for w in ws], [b[v0:v1]] * groups

    with torch.set_grad_enabled(grad):
        p = stream_head(h, t, chunks(2), group_of, 2, mean_row=True)
    full = torch.stack([h[i] @ ws[int(g)].T + b for i, g in enumerate(group_of)])
    nll = torch.nn.functional.cross_entropy(full, t, reduction="none")
    assert torch.allclose(p.nll, nll, atol=1e-5)
    assert torch.equal(p.correct, (full.argmax(1) == t).float())
    mean = torch.stack([torch.softmax(full[i], 0) @ ws[int(g)] for i, g in enumerate(group_of)])
    assert torch.allclose(p.mean_row, mean, atol=1e-6)
    with pytest.raises(ValueError, match="uncapped"):
        stream_head(h, t, PlainHead.of(ws[0]).chunks(1), softcap=30.0, mean_row=True)
