"""Quantization round trips and the side network's guarantees (no server needed)."""

from __future__ import annotations

import pytest
import torch

from pocketllm.split.quant import BITS, dequantize, payload_bytes, quantize
from pocketllm.split.side import (AttachedSide, SideConfig, SideNetwork, head_loss_grad,
                                  side_from_bytes, side_to_bytes, tap_layers)


@pytest.mark.parametrize("bits,tol", [(32, 0.0), (16, 2e-3), (8, 1 / 127), (4, 1 / 7)])
def test_roundtrip_error_within_half_a_step(bits, tol):
    x = torch.randn(6, 9) * torch.logspace(-2, 2, 6)[:, None]  # rows of very different scale
    data, scales = quantize(x, bits)
    assert len(data) + len(scales) == payload_bytes(6, 9, bits)
    y = dequantize(data, scales, 6, 9, bits)
    rel = ((y - x).abs().amax(1) / x.abs().amax(1))
    assert (rel <= tol * 0.51 + 1e-6).all() if bits < 16 else (rel <= tol + 1e-7).all()


@pytest.mark.parametrize("bits", BITS)
def test_truncated_or_mislabelled_payload_raises(bits):
    data, scales = quantize(torch.randn(3, 5), bits)
    with pytest.raises(ValueError):
        dequantize(data[:-1], scales, 3, 5, bits)
    with pytest.raises(ValueError):
        dequantize(data, scales, 4, 5, bits)


def test_nonfinite_payload_raises():
    data, _ = quantize(torch.tensor([[float("inf"), 1.0]]), 32)
    with pytest.raises(ValueError, match="non-finite"):
        dequantize(data, b"", 1, 2, 32)


def test_tap_layers():
    assert tap_layers(30, 1) == list(range(30))
    assert tap_layers(30, 4) == [3, 7, 11, 15, 19, 23, 27]
    assert tap_layers(2, 4) == [1]


def test_head_loss_grad_matches_autograd():
    torch.manual_seed(0)
    w, b = torch.randn(5000, 16), torch.randn(5000)  # more than one vocab chunk
    z = torch.randn(7, 16, requires_grad=True)
    t = torch.randint(0, 5000, (7,))
    ref = torch.nn.functional.cross_entropy(z @ w.T + b, t)
    ref.backward()
    loss, g = head_loss_grad(z, t, w, b)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g, z.grad, atol=1e-6)


def test_head_loss_grad_with_candidates_matches_autograd(monkeypatch):
    """Label words' head rows are gathered a block of rows at a time (3 rows here): the same
    loss and gradient as autograd through the whole (rows, C, H) gather."""
    from pocketllm.split import side
    monkeypatch.setattr(side, "CANDIDATE_BLOCK", 3 * 4 * 16)
    torch.manual_seed(0)
    w, b = torch.randn(50, 16), torch.randn(50)
    z = torch.randn(7, 16, requires_grad=True)
    cands = torch.randint(0, 50, (7, 4))
    t = torch.randint(0, 4, (7,))
    ref = torch.nn.functional.cross_entropy(torch.einsum("nh,nch->nc", z, w[cands]) + b[cands], t)
    ref.backward()
    loss, g = head_loss_grad(z, t, w, b, candidates=cands)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g, z.grad, atol=1e-6)


def test_untrained_side_network_predicts_what_the_backbone_does():
    from pocketllm.models import load_model
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        cfg = SideConfig(model="tiny-llama", hidden=64, taps=tap_layers(2, 1), width=8)
        attached = AttachedSide(model, SideNetwork(cfg))
        out = model(input_ids=ids).logits
        attached.detach()
    assert torch.equal(ref, out)


def test_side_network_blob_roundtrip():
    cfg = SideConfig(model="tiny-llama", hidden=64, taps=[0, 1], width=8, depth=2, seed=3)
    a = SideNetwork(cfg)
    b = side_from_bytes(side_to_bytes(a))
    assert b.cfg == cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_session_trains_as_plain_adamw_and_reloads_exactly(tmp_path):
    """The server's session allocates AdamW's state up front and reloads its checkpoint into
    those buffers: the same steps as a plain (lazily initialised) AdamW, bit for bit, across a
    reload."""
    from pocketllm.split.server import Session
    cfg = SideConfig(model="x", hidden=16, taps=[0, 1], width=8, depth=1, weight_decay=0.1)
    torch.manual_seed(0)
    taps = [[torch.randn(5, 16) for _ in cfg.taps] for _ in range(4)]
    grads = [torch.randn(5, 16) for _ in range(4)]
    ref = SideNetwork(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.learning_rate, weight_decay=0.1)
    s = Session("0" * 32, cfg, tmp_path / "s.pt", "owner")
    s.build()
    s.save()
    for i in range(4):
        for net, o in ((ref, opt), (s.net, s.opt)):
            o.zero_grad(set_to_none=True)
            net(taps[i]).backward(grads[i])
            o.step()
        s.step += 1
        s.save()
        if i == 1:
            s.unload()
            s.reload()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                 s.net.state_dict().values()))
    for p, q in zip(ref.parameters(), s.net.parameters()):
        assert all(torch.equal(opt.state[p][k], s.opt.state[q][k]) for k in opt.state[p])
