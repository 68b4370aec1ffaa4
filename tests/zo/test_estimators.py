"""Every registered estimator estimates the gradient: on a quadratic, its estimate averaged over
many draws points along the true gradient, with about its length.

    f(w) = 0.5 (w - w*)^T A (w - w*),  A diagonal positive,  grad f(w) = A (w - w*)

Each replica (query j, sign s) is evaluated exactly, f(w + s eps z_j) (query -1: f(w)), with z_j
the run's noise of that query's key (`zo.noise`), and the estimate is what a step applies,
g_hat = (1/q) sum_j g_j z_j. A new estimator is checked by registering it.

An anchored estimator (svrg) also evaluates replicas at its anchor w_bar (`Replica.anchor`),
here halfway between w and w* (so that grad f(w_bar) = grad f(w) / 2: an anchor term evaluated
at the wrong point would halve the estimate), and adds the anchor's estimate, its refresh
replicas at w_bar along independent keys: the average of the whole must still be grad f(w).

An estimator with `normalised = True` (fzoo) estimates the gradient's direction at a fixed
scale by design (normalised SGD): its average is checked for direction and for about unit
length instead of the gradient's length, and its projected gradients for not changing when the
losses are scaled or shifted. One that needs more queries (`min_queries`) must refuse fewer.
"""

from __future__ import annotations

import math

import pytest
import torch

from pocketllm.zo import noise
from pocketllm.zo.estimators import REGISTRY
from pocketllm.zo.plan import PARALLEL, group_passes

N = 256      # coordinates
DRAWS = 6000  # independent estimates averaged
EPS = 1e-3


def _quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(N, generator=g, dtype=torch.float64) * 1.5 + 0.5   # A = diag(a), in [0.5, 2]
    w_star = torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.randn(N, generator=g, dtype=torch.float64)
    return a, w_star, w


def _z(queries: int, dist: str, step: int = 0) -> torch.Tensor:
    """(DRAWS, queries, N): draw d's z of query j is z(key_j) over the coordinates
    [d N, (d + 1) N) of its counter-based stream, i.e. `noise(key_j, d N, N)`: independent
    draws, generated in one call per query (`step`: another step's keys, independent)."""
    zs = [noise.noise(noise.derive_key(11, step, j), 0, DRAWS * N, dist).view(DRAWS, N)
          for j in range(queries)]
    return torch.stack(zs, 1).double()


def _losses(f, reps, Z, w, anchor=None) -> torch.Tensor:
    """(DRAWS, len(reps)): each replica's loss, at `anchor` for the anchor's replicas."""
    ones = torch.ones(DRAWS, dtype=torch.float64)
    at = [anchor if r.anchor else w for r in reps]
    return torch.stack([f(x) * ones if r.query < 0 else f(x + r.sign * EPS * Z[:, r.query])
                        for r, x in zip(reps, at)], 1)


def _estimates(name: str, queries: int, dist: str):
    """Per draw: the q projected gradients and g_hat; and the true gradient."""
    a, w_star, w = _quadratic()
    f = lambda x: 0.5 * (a * (x - w_star) ** 2).sum(-1)  # noqa: E731  (batched over draws)
    est = REGISTRY[name](queries)
    reps = est.replicas()
    Z = _z(queries, dist)
    w_bar = (w + w_star) / 2 if est.anchor_every else None
    L = _losses(f, reps, Z, w, w_bar)
    G = torch.tensor([est.projected(L[d], EPS) for d in range(DRAWS)], dtype=torch.float64)
    g_hat = (G[:, :, None] * Z).mean(1)           # (1/q) sum_j g_j z_j, per draw
    if est.anchor_every:  # + (1/q) sum_j a_j z_a,j: the anchor's, refreshed at w_bar
        Za = _z(queries, dist, step=1)
        La = _losses(f, est.refresh_replicas(), Za, w_bar)
        A = torch.tensor([est.refresh_projected(La[d], EPS) for d in range(DRAWS)],
                         dtype=torch.float64)
        g_hat += (A[:, :, None] * Za).mean(1)
    return est, reps, G, g_hat, a * (w - w_star)


@pytest.mark.parametrize("dist", noise.DISTS)
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_average_estimate_points_along_the_gradient(name, queries, dist):
    if _refuses(name, queries):
        return
    est, reps, G, g_hat, grad = _estimates(name, queries, dist)
    assert G.shape == (DRAWS, queries) and torch.isfinite(G).all()
    mean = g_hat.mean(0)
    cos = torch.nn.functional.cosine_similarity(mean, grad, dim=0).item()
    # The sampling error of the mean has relative size ~ sqrt(N / (q DRAWS)) <= 0.21 here, so
    # an unbiased estimate gives cos ~ 0.98 and a norm ratio ~ sqrt(1 + 0.04) (SPSA on a
    # quadratic: E[g_hat] = E[z z^T] grad = grad exactly; seen: cos >= 0.977, ratio in
    # 0.99..1.03); a biased, mis-scaled or query-mixing estimate does not.
    assert cos > 0.9, (name, queries, dist, cos)
    if est.normalised:
        # the mean of a normalised estimate is about grad / |grad| (fzoo, q=4: cos 0.993,
        # length 1.03..1.05; |grad| is ~30 here, so an unnormalised one is far off)
        ratio = mean.norm().item()
        assert 0.8 < ratio < 1.25, (name, queries, dist, ratio)
    else:
        ratio = (mean.norm() / grad.norm()).item()
        assert 0.9 < ratio < 1.15, (name, queries, dist, ratio)


def _refuses(name: str, queries: int) -> bool:
    """Whether the estimator needs more than `queries` queries; then it must say so."""
    if queries >= REGISTRY[name].min_queries:
        return False
    with pytest.raises(ValueError, match="--queries"):
        REGISTRY[name](queries)
    return True


@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_replicas_and_one_finite_scalar_per_query(name, queries):
    if _refuses(name, queries):
        queries = REGISTRY[name].min_queries
    est = REGISTRY[name](queries)
    reps = est.replicas()
    assert reps and all(-1 <= r.query < queries for r in reps)
    assert {r.query for r in reps} >= set(range(queries))  # every query is evaluated
    assert all(r.sign == 0 for r in reps if r.query < 0)   # query -1 is the unperturbed model
    for parallel in PARALLEL:  # any grouping evaluates every replica exactly once
        passes = group_passes(reps, parallel, max_replicas=3)
        assert sorted(i for p in passes for i in p) == list(range(len(reps)))
    g = est.projected(torch.linspace(1.0, 2.0, len(reps), dtype=torch.float64), EPS)
    assert len(g) == queries and all(isinstance(x, float) and math.isfinite(x) for x in g)
    if est.anchor_every:  # a refresh: replicas at the current weights, q scalars
        refresh = est.refresh_replicas()
        assert refresh and not any(r.anchor for r in refresh)
        assert {r.query for r in refresh} >= set(range(queries))
        a = est.refresh_projected(torch.linspace(1.0, 2.0, len(refresh), dtype=torch.float64),
                                  EPS)
        assert len(a) == queries and all(isinstance(x, float) and math.isfinite(x) for x in a)
        assert [est.refreshes(s) for s in range(2 * est.anchor_every + 1)] == \
            [s % est.anchor_every == 0 for s in range(2 * est.anchor_every + 1)]
    else:
        assert not any(r.anchor for r in reps) and not est.refreshes(0)
    if est.normalised:  # its scale is its own: scaling or shifting the losses changes nothing
        L = torch.linspace(1.0, 2.0, len(reps), dtype=torch.float64) ** 2
        assert est.projected(3.7 * L - 1.3, EPS) == pytest.approx(est.projected(L, EPS))
    assert est.spec() == {**est.spec(), "name": name, "queries": queries}
    with pytest.raises(ValueError, match="--queries"):
        REGISTRY[name](0)
