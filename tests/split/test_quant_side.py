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
