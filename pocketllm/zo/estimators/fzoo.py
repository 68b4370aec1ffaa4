"""fzoo: FZOO's normalised one-sided estimate (Dang et al., "FZOO: Fast Zeroth-Order Optimizer
for Fine-Tuning Large Language Models towards Adam-Scale Speed", arXiv 2506.09034):

    l_0 = L(w),  l_j = L(w + eps u_j)  (j < N),  sigma = std(l_1 .. l_N)  (sample, N - 1)
    g_j = (l_j - l_0) / sigma,         g_hat = (1/N) sum_j g_j u_j,       w <- w - lr g_hat

N queries share one unperturbed loss: N + 1 replicas, in one forward with `--parallel both`.
Since l_j - l_0 ~ eps u_j . grad and sigma ~ eps |grad| (for Rademacher u, var(u . grad) =
|grad|^2 exactly), eps cancels and g_hat ~ (1/N) sum_j (u_j . grad/|grad|) u_j, whose mean is
grad / |grad|: the paper's normalised-SGD reading of the step. Its length no longer follows
the gradient's (large steps where the loss is flat, small where it is steep), so lr is a step
length, not a multiple of the gradient: an SPSA run's lr does not carry over. Not an unbiased
gradient estimate by design (`normalised = True`: tests/zo/test_estimators.py checks its
direction and its invariance to the loss's scale and offset instead of its length).

The paper draws u as Rademacher (+-1: `--perturbation rademacher`); any `zo.noise` distribution
works. The paper's step is theta <- theta - eta g_t / sigma_t with g_t = (1/(eps N)) sum_i
(l_i - l_0) u_i as one summary writes it (https://junaidaliop.github.io/zij/math/fzoo/, with
the sample variance, N - 1, as here); if so, its eta is this lr times eps.

sigma needs two perturbed losses (`min_queries = 2`), but use N >= 4: (N - 1) sigma^2 / var is
about chi-square with N - 1 degrees of freedom, so 1/sigma has an infinite mean at N = 2 and an
infinite variance at N = 3 (rare huge steps; on the conformance quadratic the largest |g_j| in
6000 draws is 60-120 at N = 3, 17 at N = 4). When the N losses agree to float32 rounding (sigma
at most float32's epsilon times max(1, |l_0|)) the step has no direction to normalise: the
projected gradients are 0 (no step), not a division by ~0.

The log stores the N projected gradients as for every estimator, so `--resume` and `pocketllm
replay` rebuild the weights exactly without re-evaluating sigma.
"""

from __future__ import annotations

import torch

from ..plan import Replica
from .base import Estimator, register

# a spread of the perturbed losses below this (relative to the loss, floored at 1) is rounding
SIGMA_FLOOR = torch.finfo(torch.float32).eps


@register("fzoo")
class FZOO(Estimator):
    min_queries = 2  # a standard deviation of one loss is undefined
    normalised = True

    def replicas(self) -> list[Replica]:
        # the unperturbed replica first: a shared baseline for the N one-sided differences
        return [Replica(-1, 0.0)] + [Replica(j, 1.0) for j in range(self.queries)]

    def projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        return self.traced(losses, eps).tolist()

    def traced(self, losses, eps):
        l0, L = losses[0], losses[1:]
        sigma = L.std()  # sample standard deviation (N - 1), as the paper's sigma_t
        # where, not an if: the same ops in an exported program (the other branch's 0/0 is
        # computed and dropped)
        flat = sigma <= SIGMA_FLOOR * torch.clamp(l0.abs(), min=1.0)
        return torch.where(flat, torch.zeros_like(L), (L - l0) / sigma)
