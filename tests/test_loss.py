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
    b = tiny_batch(tok, TEXTS[:4])  # (groups of other rows: the same rows share one pass)
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


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_groups_of_the_same_rows_read_the_head_once(softcap, monkeypatch):
    """When every group scores the same hidden states (a frozen backbone under the feature
    cache), a chunk all groups share, or share but for their own offsets to a few rows
    (`head_rows.PatchedGroups`), is multiplied once for one group's rows: the figures are
    those of each group's full logits."""
    import pocketllm.loss as L
    from pocketllm.head_rows import PatchedGroups, RowsHead
    monkeypatch.setattr(L, "VOCAB_CHUNK", 300)  # 1000 = 3 x 300 + 100
    torch.manual_seed(0)
    G, H = 3, 8
    head = RowsHead(torch.nn.Linear(H, 1000, bias=False), torch.tensor([5, 299, 300, 640]))
    table, b = head.base.weight.detach(), torch.randn(1000)
    deltas = [torch.randn(4, H) for _ in range(G)]
    h1 = torch.randn(4, H)
    t1 = torch.tensor([299, 7, 640, 950])  # targets on trained rows and off them
    h, t = h1.repeat(G, 1), t1.repeat(G)
    group_of = torch.arange(G).repeat_interleave(4)
    products = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, c: (products.append(a.shape[0]), real_mm(a, c))[1])

    def chunks(groups):
        for v0 in range(0, 1000, L.VOCAB_CHUNK):
            v1 = min(v0 + L.VOCAB_CHUNK, 1000)
            ws = [table[v0:v1]] * groups
            yield v0, v1, PatchedGroups(head, v0, v1, ws, deltas), [b[v0:v1]] * groups

    with torch.no_grad():
        p = stream_head(h, t, chunks(G), group_of, G, softcap=softcap)
    assert products and set(products) == {4}  # one group's rows, each chunk once
    assert len(products) == 4 + 3  # 4 chunks, and 3 of them hold trained rows
    full = []
    for g in range(G):
        w = table.index_add(0, head.ids, deltas[g])
        lg = real_mm(h1, w.T) + b
        full.append(torch.tanh(lg / softcap) * softcap if softcap else lg)
    full = torch.cat(full)
    nll = torch.nn.functional.cross_entropy(full, t, reduction="none")
    assert torch.allclose(p.nll, nll, atol=1e-5)
    assert torch.allclose(p.top, full.amax(1))
    assert torch.equal(p.correct, (full.argmax(1) == t).float())


@pytest.mark.parametrize("softcap,train_head", [(None, True), (5.0, True), (None, False),
                                                (5.0, False)])
def test_recomputed_head_equals_the_autograd_path(softcap, train_head, monkeypatch):
    """`recomputed_head`: the same figures (bit for bit) and gradients for the hidden states
    and (`train_head`) the head's weight and bias, with a short last chunk; it keeps no chunk's
    logits for the backward (recomputed, or only the hidden states' mean row kept)."""
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 300)  # 1000 = 3 x 300 + 100
    torch.manual_seed(0)
    w0, b0 = torch.randn(1000, 8), torch.randn(1000)
    h0, t = torch.randn(6, 8), torch.randint(0, 1000, (6,))
    t[0] = 999  # a target in the last, short chunk
    out = []
    for recompute in (False, True):
        w, b, h = (x.clone().requires_grad_(x is h0 or train_head) for x in (w0, b0, h0))
        saved, head = [0], {w.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}

        def pack(x):  # the largest saved tensor besides the head's own weights
            if x.untyped_storage().data_ptr() not in head:
                saved.append(x.numel())
            return x
        with L.recomputed_head() if recompute else torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                p = stream_head(h, t, PlainHead.of(w, b).chunks(1), softcap=softcap)
        # a loss that reads the target logit and the log-sum-exp with different weights
        (p.nll.sum() + 0.5 * p.lse.square().sum()).backward()
        out.append((p, h.grad, w.grad, b.grad, max(saved)))
    (p, *grads, most), (q, *grads_r, most_r) = out
    for a, r in ((p.lse, q.lse), (p.target, q.target), (p.top, q.top)):
        assert torch.equal(a.detach(), r.detach())
    assert [g is None for g in grads] == [g is None for g in grads_r] == [
        False, not train_head, not train_head]
    for g, gr in zip(grads, grads_r):
        assert g is None or torch.allclose(g, gr, rtol=1e-5, atol=1e-6)
    assert most >= 6 * 300 and most_r <= 6 * 8  # chunks' logits vs the hidden states


def test_recomputed_head_leaves_the_no_grad_and_grouped_paths_alone():
    import pocketllm.loss as L
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS[:2] * 2)
    with torch.no_grad():
        want = LanguageModeling().stats(model, b, groups=2)
    with L.recomputed_head(), torch.no_grad():
        got = LanguageModeling().stats(model, b, groups=2)
    assert torch.equal(got.nll, want.nll) and torch.equal(got.correct, want.correct)
    with L.recomputed_head():  # two groups under autograd: the plain path (one group only)
        nll = LanguageModeling().stats(model, b, groups=2).nll
    assert nll.grad_fn is not None and torch.equal(nll.detach(), want.nll)
