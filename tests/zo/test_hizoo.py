"""hizoo (HiZOO, arXiv 2402.15173): the estimator reports the second difference, the perturbation
scales z by the running diagonal estimate it updates, and a step's update is the probed z."""

from __future__ import annotations

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise
from pocketllm.zo.estimators import REGISTRY as ESTIMATORS
from pocketllm.zo.log import KeySpace
from pocketllm.zo.perturbations.hizoo import HiZOO
from pocketllm.zo.plan import Replica
from tests.helpers import TEXTS, tiny_batch


def test_the_estimator_adds_the_unperturbed_loss_and_reports_the_curvature():
    est = ESTIMATORS["hizoo"](2)
    assert est.replicas() == [Replica(-1, 0.0), Replica(0, 1.0), Replica(0, -1.0),
                              Replica(1, 1.0), Replica(1, -1.0)]
    L = torch.tensor([1.0, 1.3, 0.9, 0.95, 1.15], dtype=torch.float64)
    eps = 0.1
    assert est.projected(L, eps) == pytest.approx([0.4 / 0.2, -0.2 / 0.2])
    assert est.report(L, eps)["curvature"] == pytest.approx([0.2 / 0.02, 0.1 / 0.02])


def test_z_is_scaled_by_the_running_estimate_it_updates():
    w = torch.zeros(3, 5)
    pert = HiZOO([w], smooth=0.25)
    key = pert.keys(KeySpace(1), 0, 1, 1)[0][0]
    n = noise.noise(key, 0, 15).view(3, 5)
    assert torch.equal(pert.z(0, key, w), n)  # S = 1 at the start: dense z
    pert.observe([[key]], {"curvature": [8.0]})
    S = 0.75 + 0.25 * 8.0 * n.reshape(-1) ** 2
    assert torch.allclose(pert.S[0], S)
    assert torch.allclose(pert.z(0, key, w), n * S.view(3, 5).sqrt())
    # the next observation divides by the S the step was probed with
    k2 = pert.keys(KeySpace(1), 1, 1, 1)[0][0]
    n2 = noise.noise(k2, 0, 15)
    pert.observe([[k2]], {"curvature": [2.0]})
    assert torch.allclose(pert.S[0], 0.75 * S + 0.25 * 2.0 * n2 ** 2 / S)
    # a diverged step (non-finite curvature) leaves it as it was
    before = pert.S[0].clone()
    pert.observe([[k2]], {"curvature": [float("nan")]})
    assert torch.equal(pert.S[0], before)


def test_a_step_moves_the_adapter_along_the_z_it_probed():
    """prge --estimator hizoo --zo-perturbation hizoo on tiny-llama's LoRA: the update is
    -lr g sqrt(S_before) n, exactly, and S moves after it."""
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method="prge", trainable="lora", seed=3, lora_rank=4)
    _, params = setup_trainable(model, args)
    m = build("prge", model, params, args, estimator="hizoo", zo_perturbation="hizoo",
              hessian_smooth=0.1, queries=1, eps=1e-2, perturbation="gaussian")
    b = tiny_batch(tok, TEXTS)
    m.step([b], 0, 1e-2)  # S moved off 1 by the first step
    recs = []
    m._log = recs.append
    w0 = [p.detach().clone() for _, p in params]
    S0 = [s.clone() for s in m.perturbation.S]
    lr = 5e-3
    m.step([b], 1, lr)
    m.sync()
    g = recs[-1]["projected_grads"][0]
    assert recs[-1]["curvature"][0] > 0 and g != 0
    keys = m.keys(1)[0]
    for (n, p), p0, s, k in zip(params, w0, S0, keys):
        z = noise.noise(k, 0, p.numel()).view(p.shape) * s.sqrt().view(p.shape)
        want = (p0.float() + z * torch.tensor(-lr * g, dtype=torch.float32)).to(p.dtype)
        assert torch.equal(p, want), n
    assert not all(torch.equal(a, b) for a, b in zip(S0, m.perturbation.S))
