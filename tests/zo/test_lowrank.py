"""lowrank (LOZO, arXiv 2410.07698): each matrix's z = U V^T / sqrt(r) has rank <= r, V is shared
by a step's queries and kept for `refresh` steps, and a window's updates stay in its subspace."""

from __future__ import annotations

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo.log import KeySpace
from pocketllm.zo.perturbations.lowrank import LowRank
from tests.helpers import TEXTS, tiny_batch


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rank", [1, 3])
def test_a_matrix_z_has_rank_at_most_r_and_unit_variance(rank, dist):
    params = [torch.zeros(300, 200), torch.zeros(50)]
    pert = LowRank(params, dist, rank=rank, refresh=4)
    keys = pert.keys(KeySpace(1), 0, 1, 2)[0]
    z = pert.z(0, keys[0], params[0])
    assert torch.linalg.matrix_rank(z.double(), rtol=1e-5).item() == rank  # float32 z
    # E[z z^T] = I as for dense z (lr and eps keep their meaning at any rank): the mean of z^2
    # over 40 draws of U and V (one draw's spread is ~15% at r = 1: V has only n r entries)
    fresh = LowRank(params, dist, rank=rank, refresh=1)
    sq = [fresh.z(0, fresh.keys(KeySpace(1), s, 1, 2)[0][0], params[0]).pow(2).mean().item()
          for s in range(40)]
    assert 0.93 < sum(sq) / len(sq) < 1.07, sq
    v = pert.z(1, keys[1], params[1])  # a vector: dense z
    assert torch.count_nonzero(v) == 50 and 0.6 < v.pow(2).mean().item() < 1.5


def test_the_subspace_is_shared_by_queries_and_kept_for_refresh_steps():
    pert = LowRank([torch.zeros(8, 6)], rank=2, refresh=3)
    space = KeySpace(5)
    keys = {s: pert.keys(space, s, 2, 1) for s in range(7)}
    v_of = {s: {k[0][1] for k in keys[s]} for s in keys}
    assert all(len(v) == 1 for v in v_of.values())  # one V per step, shared by the queries
    assert v_of[0] == v_of[1] == v_of[2] != v_of[3] == v_of[4] == v_of[5] != v_of[6]
    us = [k[0][0] for s in keys for k in keys[s]]
    assert len(set(us)) == len(us)  # U drawn afresh for every query of every step
    # z of one window: its column space is V's (z^T lies in span V): stacked, still rank 2
    zs = torch.cat([pert.z(0, k[0], torch.zeros(8, 6)) for s in (0, 1, 2) for k in keys[s]])
    assert torch.linalg.matrix_rank(zs.double(), rtol=1e-5).item() == 2


def test_a_window_of_updates_changes_each_matrix_by_rank_at_most_r():
    """zo-sgd on every weight of tiny-llama for the 3 steps of one subspace window: each
    matrix's total change is sum_t g_t U_t V^T / sqrt(r), rank <= r (up to float32 rounding of
    the stored weights)."""
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method="zo-sgd", trainable="full", seed=2)
    _, params = setup_trainable(model, args)
    before = [p.detach().clone().double() for _, p in params]
    m = build("zo-sgd", model, params, args, eps=1e-3, zo_perturbation="lowrank",
              lowrank_rank=2, lowrank_refresh=3, perturbation="gaussian")
    b = tiny_batch(tok, TEXTS)
    for step in range(3):
        m.step([b], step, 1e-2)
    m.sync()
    checked = 0
    for (n, p), p0 in zip(params, before):
        d = p.double() - p0
        if p.dim() != 2:
            continue
        s = torch.linalg.svdvals(d)
        assert s[0] > 0, n
        assert (s[2:] <= 1e-3 * s[0]).all(), (n, s[:4])  # rank 2 up to rounding
        checked += 1
    assert checked >= 5
