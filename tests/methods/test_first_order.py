"""The first-order methods' activation checkpointing (`--activation-checkpointing`, MeBP):
the same gradients as plain backprop, only the layers' inputs kept, the model left as it was,
and a resumed run equal to an uninterrupted one."""

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.memory_estimate import saved_activation_bytes
from pocketllm.methods import build, get_method
from pocketllm.methods.first_order import checkpointed
from pocketllm.models import load_model
from pocketllm.loss import decoder_layers
from pocketllm.workload import Scored, fixed_batch, masked_lm_stats
from tests.helpers import TEXTS, score, tiny_batch
from tests.methods.test_conformance import (ITERS, _same, _saved, _step_losses, _train,  # noqa: F401
                                            data_dir)


def _batch(name, tok, model):
    if name == "tiny-roberta":  # a masked LM: one <mask> per row through its MLM head
        return fixed_batch(model.config.vocab_size, 4, 16, masked=True), Scored(masked_lm_stats)
    return tiny_batch(tok, TEXTS), None


def _grads(name, method, trainable, ckpt, batches=1):
    """The loss and gradients of one step (learning rate 0) of `method`, checkpointed or not."""
    model, tok = load_model(name)
    run = TrainArgs(model=name, method=method, trainable=trainable, seed=3, lora_rank=4,
                    learning_rate=1e-3)
    _, params = get_method(method).trainable(model, run)
    b, objective = _batch(name, tok, model)
    m = build(method, model, params, run, objective, activation_checkpointing=ckpt)
    with torch.no_grad():  # B = 0 at init would leave A without a gradient
        for n, p in m.params:
            if "lora_B" in n:
                p.add_(0.01)
    res = m.step([b] * batches, 0, 0.0)
    return res.loss, {n: p.grad.clone() for n, p in m.params if p.grad is not None}


@pytest.mark.parametrize("name,method,trainable", [
    ("tiny-llama", "lora-adam", "lora"), ("tiny-gpt2", "lora-adam", "lora"),
    ("tiny-opt", "lora-adam", "lora"), ("tiny-roberta", "lora-adam", "lora"),
    ("tiny-gemma", "lora-adam", "lora"),  # its head's logits are soft-capped
    ("tiny-llama", "adam", "full"),       # the head's (tied) weight through the recomputed loss
    ("tiny-gpt2", "adam", "full")])
def test_checkpointed_gradients_equal_plain_backprop(name, method, trainable):
    loss, plain = _grads(name, method, trainable, ckpt=False)
    loss_ck, ck = _grads(name, method, trainable, ckpt=True)
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert plain.keys() == ck.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(ck[n], plain[n], rtol=1e-4, atol=1e-6), n
        assert plain[n].abs().sum() > 0, n


def test_checkpointed_gradients_accumulate_over_micro_batches():
    # the gradients stay allocated between steps and micro-batches add into them
    _, one = _grads("tiny-llama", "lora-adam", "lora", ckpt=True, batches=1)
    _, two = _grads("tiny-llama", "lora-adam", "lora", ckpt=True, batches=2)
    for n in one:  # each micro-batch weighs 1/2 of the step's tokens: the same gradient
        assert torch.allclose(two[n], one[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_only_the_layers_inputs_are_kept(name):
    model, tok = load_model(name)
    run = TrainArgs(model=name, trainable="lora", lora_rank=4)
    _, params = get_method("lora-adam").trainable(model, run)
    for _, p in params:
        p.requires_grad_(True)
    b = tiny_batch(tok, TEXTS)
    plain = saved_activation_bytes(model, b, lambda: score(model, b))
    with checkpointed(model):
        ck = saved_activation_bytes(model, b, lambda: score(model, b))
    B, T = b["input_ids"].shape
    hidden = B * T * model.config.hidden_size * 4
    layers = len(decoder_layers(model))
    # every layer's input, and the final norm's and the loss's few hidden-sized tensors
    assert layers * hidden <= ck <= (layers + 4) * hidden, (ck, hidden)
    assert ck < plain / 5


def test_the_model_is_left_as_it_was():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        before = score(model, b).nll
    with checkpointed(model):
        assert all("forward" in vars(layer) for layer in decoder_layers(model))
        with torch.no_grad():  # without autograd the layers run as they are
            assert torch.equal(score(model, b).nll, before)
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(score(model, b).nll, before)


def test_checkpointed_resume_equals_an_uninterrupted_run(tmp_path, data_dir, capsys):
    flags = ["--activation-checkpointing"]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _train(ref, data_dir, "lora-adam", "lora", ITERS, flags)
    _train(cut, data_dir, "lora-adam", "lora", ITERS // 2, flags)
    capsys.readouterr()
    _train(cut, data_dir, "lora-adam", "lora", ITERS, [*flags, "--resume"])
    assert f"resumed from {cut} at step {ITERS // 2}" in capsys.readouterr().out
    assert _step_losses(cut) == _step_losses(ref)
    a, b = _saved(ref), _saved(cut)
    assert a.keys() == b.keys() and a
    for k in a:
        assert _same(a[k], b[k]), k
