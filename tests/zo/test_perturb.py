import copy

import pytest
import torch
import torch.nn as nn

from pocketllm.loss import group_losses
from pocketllm.lora import LoraSpec, apply_lora, lora_parameters
from pocketllm.models import load_model
from pocketllm.zo import noise
from pocketllm.zo.perturb import Perturber
from tests.helpers import TEXTS, tiny_batch, score


def _explicit_loss(model, params, keys, eps, sign, batch, dist="gaussian"):
    """Reference: perturb a deep copy's stored weights in place, then a plain forward."""
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    with torch.no_grad():
        for (n, _), k in zip(params, keys):
            noise.add_noise_(named[n].data, k, 0, sign * eps, dist)
        return group_losses(score(m, batch), 1).item()


def _pair_losses(model, pert, keys, eps, batch):
    pair = {k: torch.cat([v, v]) for k, v in batch.items()}
    with pert.active(keys, eps, (1.0, -1.0), rows=pair["input_ids"].shape[0]) as hc:
        return group_losses(score(model, pair, 2, hc), 2).tolist()


def _trainable(model, name, trainable):
    """LoRA (with B moved off 0, which would hide a wrong A perturbation) or all weights."""
    if trainable != "lora":
        return list(model.named_parameters())
    torch.manual_seed(0)
    apply_lora(model, LoraSpec(r=4, targets=["c_attn"] if "gpt2" in name else ["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.add_(0.05)
    return lora_parameters(model)


def _check_pair_equals_explicit(model, params, b, seed):
    keys = [noise.derive_key(seed, 0, i) for i in range(len(params))]
    eps = 1e-2
    lp, lm = _pair_losses(model, Perturber(model, params), keys, eps, b)
    assert lp == pytest.approx(_explicit_loss(model, params, keys, eps, 1.0, b), abs=2e-5)
    assert lm == pytest.approx(_explicit_loss(model, params, keys, eps, -1.0, b), abs=2e-5)
    assert lp != pytest.approx(lm, abs=1e-7)


@pytest.mark.parametrize("name,trainable", [("tiny-llama", "full"), ("tiny-gpt2", "full"),
                                            ("tiny-opt", "full"), ("tiny-gemma", "full"),
                                            ("tiny-llama", "lora"), ("tiny-gpt2", "lora")])
def test_pair_forward_equals_explicitly_perturbed_weights(name, trainable):
    model, tok = load_model(name)
    params = _trainable(model, name, trainable)
    _check_pair_equals_explicit(model, params, tiny_batch(tok, TEXTS), seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_update_equals_direct_update_bitwise(dtype):
    model, tok = load_model("tiny-llama", dtype=str(dtype).split(".")[1])
    params = list(model.named_parameters())
    ref = copy.deepcopy(model)
    b = tiny_batch(tok, TEXTS[:2])
    pert = Perturber(model, params)
    k0 = [noise.derive_key(1, 0, i) for i in range(len(params))]
    k1 = [noise.derive_key(1, 1, i) for i in range(len(params))]
    pert.schedule_update(k0, -0.3)
    _pair_losses(model, pert, k1, 1e-2, b)   # the update happens inside this forward
    assert not pert.pending
    with torch.no_grad():
        for (n, p), k in zip(ref.named_parameters(), k0):
            noise.add_noise_(p.data, k, 0, -0.3, "gaussian")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_spsa_on_a_quadratic_is_the_directional_derivative():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=True)
    x, y = torch.randn(5, 16), torch.randn(5, 8)

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, xx):
            return self.lin(xx)

    model = Quad()
    params = list(model.named_parameters())
    pert = _perturber_without_head(model, params)
    keys = [noise.derive_key(7, 0, i) for i in range(len(params))]
    eps = 1e-2
    with pert.active(keys, eps, (1.0, -1.0), rows=10):
        out = model(torch.cat([x, x]))
    lp, lm = (0.5 * ((o - y) ** 2).sum() for o in out.chunk(2))
    g = ((lp - lm) / (2 * eps)).item()
    loss = 0.5 * ((lin(x) - y) ** 2).sum()
    grads = torch.autograd.grad(loss, [p for _, p in params])
    z = [noise.noise(k, 0, p.numel()).view_as(p) for k, (_, p) in zip(keys, params)]
    directional = sum((gr * zz).sum() for gr, zz in zip(grads, z)).item()
    assert g == pytest.approx(directional, rel=1e-3)


def _perturber_without_head(model, params):
    # the Perturber looks up an LM output head; this quadratic has none
    import pocketllm.zo.perturb as P
    orig = P.output_head
    P.output_head = lambda m: nn.Identity()
    try:
        return Perturber(model, params)
    finally:
        P.output_head = orig


def test_spsa_on_the_lm_matches_autograd_directional_derivative():
    model, tok = load_model("tiny-llama")
    params = list(model.named_parameters())
    b = tiny_batch(tok, TEXTS)
    keys = [noise.derive_key(11, 0, i) for i in range(len(params))]
    eps = 1e-3
    pert = Perturber(model, params)
    lp, lm = _pair_losses(model, pert, keys, eps, b)
    g = (lp - lm) / (2 * eps)
    for _, p in params:
        p.requires_grad_(True)
    loss = group_losses(score(model, b), 1)[0]
    grads = torch.autograd.grad(loss, [p for _, p in params])
    z = [noise.noise(k, 0, p.numel()).view_as(p) for k, (_, p) in zip(keys, params)]
    directional = sum((gr * zz).sum() for gr, zz in zip(grads, z)).item()
    assert g == pytest.approx(directional, rel=2e-2, abs=1e-3)


def test_perturbed_head_in_several_chunks(monkeypatch):
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)  # the tied head/embedding in 3 chunks
    model, tok = load_model("tiny-llama")
    params = list(model.named_parameters())
    b = tiny_batch(tok, TEXTS)
    keys = [noise.derive_key(4, 0, i) for i in range(len(params))]
    lp, lm = _pair_losses(model, Perturber(model, params), keys, 1e-2, b)
    assert lp == pytest.approx(_explicit_loss(model, params, keys, 1e-2, 1.0, b), abs=2e-5)
    assert lm == pytest.approx(_explicit_loss(model, params, keys, 1e-2, -1.0, b), abs=2e-5)


@pytest.mark.parametrize("name,trainable", [("tiny-llama", "full"), ("tiny-gpt2", "full"),
                                            ("tiny-roberta", "full"), ("tiny-llama", "lora")])
def test_classification_pair_equals_explicitly_perturbed_weights(name, trainable):
    """The label-word forward under perturbation: only the label rows of the (tied, trained)
    head are perturbed, and a masked LM's head transform runs per group."""
    from tests.objectives.test_classification import _task_batch, tiny_roberta
    from pocketllm.loss import is_masked_lm
    model, tok = tiny_roberta() if name == "tiny-roberta" else load_model(name)
    params = _trainable(model, name, trainable)
    b = _task_batch(model, tok, "sst2", is_masked_lm(model))
    _check_pair_equals_explicit(model, params, b, seed=5)
