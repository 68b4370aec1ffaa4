"""Rounding drift: perturbing and restoring weights step after step must not accumulate error.

Our perturbations never touch the stored weights (they are built just in time in scratch
buffers), so the bound is exact: after any number of steps the stored weights equal the base plus
the logged updates, bit for bit, in float32 and bfloat16; with a zero learning rate they equal
the base. The naive in-place scheme (w += eps z; w -= 2 eps z; w += eps z) drifts, which the
last test shows so that the comparison is not vacuous.
"""

import copy

import pytest
import torch

from pocketllm.bench.naive_mezo import naive_zo_step
from pocketllm.config import TrainArgs
from pocketllm.loss import group_losses, token_stats
from pocketllm.methods import get_method
from pocketllm.models import load_model
from pocketllm.zo.log import replay_steps
from tests.helpers import tiny_batch

STEPS = 1000


def _run(dtype: str, lr: float):
    model, tok = load_model("tiny-llama", dtype=dtype)
    base = copy.deepcopy(model)
    batch = tiny_batch(tok, ["ab", "cd"])
    args = TrainArgs(model="tiny-llama", dtype=dtype, trainable="full", learning_rate=lr,
                     eps=1e-3, seed=5)
    params = list(model.named_parameters())
    zo = get_method("zo-sgd")(model, params, args)
    coefs = []
    for step in range(STEPS):
        g = zo.step([batch], step, lr).extra["projected_grad"]
        coefs.append({"step": step, "lr": lr, "projected_grad": g})
    zo.sync()
    return model, base, coefs, zo.args.perturbation


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_drift_with_zero_learning_rate(dtype):
    model, base, _, _ = _run(dtype, 0.0)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_are_exactly_base_plus_updates(dtype):
    model, base, coefs, dist = _run(dtype, 1e-3)
    assert dist == "rademacher"  # the full-parameter default
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    params = list(base.named_parameters())
    replay_steps(params, coefs, seed=5, dist=dist)
    for (n, p), (_, q) in zip(model.named_parameters(), params):
        assert torch.equal(p, q), n


def test_naive_in_place_scheme_does_drift_in_bfloat16():
    model, tok = load_model("tiny-llama", dtype="bfloat16")
    base = copy.deepcopy(model)
    batch = tiny_batch(tok, ["ab", "cd"])
    params = [p for p in model.parameters()]
    for step in range(100):
        naive_zo_step(params, lambda: group_losses(token_stats(model, batch), 1).item(),
                      eps=1e-3, lr=0.0, seed=step)
    drift = max((p.float() - q.float()).abs().max().item()
                for p, q in zip(model.parameters(), base.parameters()))
    assert drift > 0
