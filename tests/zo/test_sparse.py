"""sparse (Sparse-MeZO, arXiv 2402.15751): z and the update touch only the coordinates whose
magnitude is under the tensor's threshold, fixed from the weights training starts from."""

from __future__ import annotations

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo.log import KeySpace
from pocketllm.zo.perturbations.sparse import Sparse
from tests.helpers import TEXTS, tiny_batch


def test_z_is_masked_to_the_small_coordinates():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g)
    pert = Sparse([w], sparsity=0.75)
    key = pert.keys(KeySpace(1), 0, 1, 1)[0][0]
    z = pert.z(0, key, w)
    small = w.abs() <= pert.h[0]
    assert small.sum() == 300  # a quarter of the 1200 coordinates
    assert torch.all(z[~small] == 0) and torch.all(z[small] != 0)
    # the mask follows the weights as they are: a weight grown past h is no longer perturbed
    w2 = w.clone()
    w2[small] = 10.0
    assert torch.all(pert.z(0, key, w2) == 0)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0])
def test_refuses_a_sparsity_outside_0_1(sparsity):
    with pytest.raises(ValueError, match="--sparsity"):
        Sparse([torch.zeros(3)], sparsity=sparsity)


def test_only_masked_coordinates_ever_change_in_training():
    """zo-sgd on every weight of tiny-llama (the tied embedding/head included: its rows and
    chunks get their masks slice by slice), updates deferred into the next forward as in any
    run: a weight above its tensor's threshold at the start never moves."""
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method="zo-sgd", trainable="full", seed=2)
    _, params = setup_trainable(model, args)
    before = [p.detach().clone() for _, p in params]
    m = build("zo-sgd", model, params, args, eps=1e-3, zo_perturbation="sparse", sparsity=0.75,
              perturbation="gaussian")
    b = tiny_batch(tok, TEXTS)
    for step in range(4):
        m.step([b], step, 1e-3)
    m.sync()
    moved = total = 0
    for i, ((n, p), p0) in enumerate(zip(params, before)):
        frozen = p0.abs() > m.perturbation.h[i]
        assert torch.equal(p[frozen], p0[frozen]), n
        moved += int((p != p0).sum())
        total += p.numel()
    assert 0.1 * total < moved <= 0.26 * total  # about the unmasked quarter moved
