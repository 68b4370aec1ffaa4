"""fzoo (FZOO, arXiv 2506.09034): the normalised one-sided estimate. What it computes, that it
points along the gradient of a logistic regression at a scale of its own (no step-size retuning
when the loss is rescaled), that no step comes out of equal losses, that its batched and
sequential evaluations agree on a model, and that its runs replay exactly."""

from __future__ import annotations

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise, optim
from pocketllm.zo.estimators import REGISTRY
from pocketllm.zo.estimators.fzoo import FZOO
from pocketllm.zo.plan import Replica, group_passes
from tests.helpers import TEXTS, tiny_batch


def test_replicas_and_the_projected_gradients():
    est = REGISTRY["fzoo"](3)
    assert est.normalised and est.min_queries == 2
    assert est.replicas() == [Replica(-1, 0.0), Replica(0, 1.0), Replica(1, 1.0), Replica(2, 1.0)]
    L = torch.tensor([1.0, 1.5, 0.5, 1.25], dtype=torch.float64)
    sigma = (sum((x - 1.0833333333333333) ** 2 for x in (1.5, 0.5, 1.25)) / 2) ** 0.5  # N - 1
    assert est.projected(L, 1e-3) == pytest.approx([0.5 / sigma, -0.5 / sigma, 0.25 / sigma])
    # one forward of N + 1 replicas with --parallel both; N + 1 forwards with none
    assert group_passes(est.replicas(), "both") == [[0, 1, 2, 3]]
    assert len(group_passes(est.replicas(), "none")) == 4
    assert group_passes(est.replicas(), "outer") == [[0], [1, 2, 3]]


def test_equal_losses_give_no_step():
    est = FZOO(4)
    for L in ([2.0] * 5,                          # a flat loss
              [2.5] + [2.0] * 4,                  # the perturbed losses agree, l_0 apart
              [2.0, 2.0, 2.0 + 1e-8, 2.0, 2.0]):  # a spread at float32 rounding
        g = est.projected(torch.tensor(L, dtype=torch.float64), 1e-3)
        assert g == [0.0] * 4, L


def test_refuses_a_single_query():
    with pytest.raises(ValueError, match="--estimator fzoo needs at least 2 queries a step "
                       r"\(--queries"):
        FZOO(1)


# ---- logistic regression: the estimate on a problem that is not quadratic ----------------
D, ROWS = 64, 200


def _logistic():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(ROWS, D, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(D, generator=g, dtype=torch.float64) > 0).double()
    w = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)

    def loss(W):  # (..., D) -> (...): mean logistic loss, batched over leading dims
        z = W @ X.T
        return (torch.nn.functional.softplus(z) - y * z).mean(-1)

    def grad(W):
        return X.T @ (torch.sigmoid(X @ W) - y) / ROWS
    return loss, grad, w


def _draws(est, loss, w, eps, draws, dist="rademacher", scale=1.0):
    """Per draw: the N projected gradients and g_hat = (1/N) sum_j g_j u_j."""
    N = est.queries
    U = torch.stack([noise.noise(noise.derive_key(7, 0, j), 0, draws * D, dist).view(draws, D)
                     for j in range(N)], 1).double()             # (draws, N, D)
    L = torch.cat([loss(w).expand(draws, 1), loss(w + eps * U)], 1) * scale
    G = torch.tensor([est.projected(L[d], eps) for d in range(draws)], dtype=torch.float64)
    return G, (G[:, :, None] * U).mean(1)


@pytest.mark.parametrize("dist", noise.DISTS)
def test_points_along_the_gradient_with_unit_mean_length(dist):
    loss, grad, w = _logistic()
    _, g_hat = _draws(FZOO(8), loss, w, 1e-3, 4000, dist, scale=0.1)  # the loss / 10
    mean, g = g_hat.mean(0), 0.1 * grad(w)
    assert torch.nn.functional.cosine_similarity(mean, g, dim=0) > 0.95
    # normalised: about grad / |grad|, far from the gradient's own length (0.06)
    assert 0.85 < mean.norm() < 1.2 and g.norm() < 0.1


def test_its_scale_does_not_follow_the_loss_or_eps():
    """Rescaling the loss (another task's loss scale) leaves the step as it is, and eps cancels
    to first order: the step size needs no retuning for either."""
    loss, _, w = _logistic()
    est = FZOO(8)
    G, _ = _draws(est, loss, w, 1e-3, 200)
    G_scaled, _ = _draws(est, loss, w, 1e-3, 200, scale=1000.0)
    assert torch.allclose(G, G_scaled, rtol=1e-9, atol=1e-12)
    G_small_eps, _ = _draws(est, loss, w, 1e-4, 200)
    assert torch.allclose(G, G_small_eps, rtol=0, atol=0.02 * G.abs().max().item())


def test_normalised_steps_lower_the_loss_at_any_loss_scale():
    """The ZO optimizer's sgd step w -= lr (1/N) sum_j g_j u_j, on the same seeds, at loss
    scales 1 and 1000: the same lr trains both, along the same path."""
    loss, _, w0 = _logistic()
    est, N, lr = FZOO(8), 8, 0.05
    paths = []
    for scale in (1.0, 1000.0):
        w = w0.float()  # the weights a ZO optimizer updates are float32 (or half) tensors
        opt = optim.build({"name": "sgd"}, [w])
        target = optim.immediate([w], "rademacher")
        for step in range(150):
            keys = [[noise.derive_key(9, step, j)] for j in range(N)]
            U = torch.stack([noise.noise(k[0], 0, D, "rademacher").double() for k in keys])
            L = torch.cat([loss(w.double())[None], loss(w.double() + 1e-3 * U)]) * scale
            opt.apply(optim.Estimate(keys, est.projected(L, 1e-3), "rademacher"), lr, target)
        paths.append(w)
    assert loss(paths[0].double()) < 0.6 * loss(w0)
    assert torch.allclose(paths[0], paths[1], rtol=0, atol=1e-6)


# ---- on a model: prge --estimator fzoo ----------------------------------------------------
def _prge(**kw):
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method="prge", trainable="lora", seed=3, lora_rank=4,
                     learning_rate=kw.pop("learning_rate", 0.0))
    _, params = setup_trainable(model, args)
    with torch.no_grad():  # B = 0 at init would hide a wrong A perturbation
        for n, p in params:
            if ".lora_B" in n:
                p.add_(0.05)
    m = build("prge", model, params, args, estimator="fzoo", perturbation="rademacher",
              eps=1e-2, **kw)
    recs = []
    orig = m._log
    m._log = lambda rec: (recs.append(rec), orig(rec))
    return model, tok, m, args, recs


def test_batched_and_sequential_evaluations_agree():
    """--parallel both (one forward over the batch N + 1 times) and none (N + 1 forwards)."""
    b = tiny_batch(load_model("tiny-llama")[1], TEXTS)
    grads = {}
    for parallel in ("none", "outer", "both"):
        _, _, m, _, recs = _prge(queries=4, parallel=parallel)
        res = m.step([b], 0, 0.0)
        assert res.forward_passes == 5
        assert len(m.passes) == {"none": 5, "outer": 2, "both": 1}[parallel]
        grads[parallel] = recs[-1]["projected_grads"]
    ref = grads["none"]
    assert len(set(ref)) == 4 and max(abs(g) for g in ref) > 0.1
    for parallel, g in grads.items():
        assert g == pytest.approx(ref, rel=1e-3, abs=1e-3), parallel


@pytest.mark.parametrize("zo_opt,lr", [("sgd", 2e-2), ("adam", 5e-3)])
def test_lowers_the_loss_with_the_zo_optimizers(zo_opt, lr):
    model, tok, m, args, recs = _prge(queries=4, zo_optimizer=zo_opt, learning_rate=lr)
    b = tiny_batch(tok, TEXTS)

    def loss():
        m.sync()
        return m.engine.loss(b)

    before = loss()
    for s in range(20):
        m.step([b], s, lr)
    assert loss() < before - 0.02, zo_opt


@pytest.mark.parametrize("zo_opt", ["sgd", "adam"])
def test_cli_run_replays_exactly(tmp_path, zo_opt):
    """The log holds the projected gradients: replaying them rebuilds the adapter bit for bit,
    without re-evaluating sigma."""
    from safetensors.torch import load_file

    from pocketllm.cli import main
    from tests.test_cli import FAST
    out, rebuilt = tmp_path / "run", tmp_path / "rebuilt"
    assert main(["train", *FAST, "--method", "prge", "--estimator", "fzoo", "--queries", "4",
                 "--perturbation", "rademacher", "--eps", "1e-3", "--learning-rate", "1e-2",
                 "--zo-optimizer", zo_opt, "--iters", "4", "--steps-per-eval", "0",
                 "--adapter-path", str(out)]) == 0
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    r = load_file(str(rebuilt / "adapter_model.safetensors"))
    assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
