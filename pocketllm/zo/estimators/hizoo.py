"""hizoo: the two-point estimate plus the unperturbed loss, whose second difference is HiZOO's
curvature signal (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian
Informed Zeroth-Order Optimizer", arXiv 2402.15173):

    l_0 = L(w),  l_j^+- = L(w +- eps z_j)
    g_j = (l_j^+ - l_j^-) / (2 eps)                        (as spsa)
    c_j = |l_j^+ + l_j^- - 2 l_0| / (2 eps^2)              (reported: the log's "curvature")

z_j is the run's perturbation's; with `--zo-perturbation hizoo` it is scaled by the running
diagonal estimate that c updates (`zo/perturbations/hizoo.py`), which is what makes this
HiZOO. 2q + 1 replicas, in one forward with `--parallel both`.
"""

from __future__ import annotations

import torch

from ..plan import Replica
from .base import Estimator, register


@register("hizoo")
class HiZOO(Estimator):
    reports = ("curvature",)

    def replicas(self) -> list[Replica]:
        return [Replica(-1, 0.0)] + [Replica(j, s) for j in range(self.queries)
                                     for s in (1.0, -1.0)]

    def projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        L = losses[1:].view(self.queries, 2)
        return ((L[:, 0] - L[:, 1]) / (2 * eps)).tolist()

    def report(self, losses: torch.Tensor, eps: float) -> dict[str, list[float]]:
        L = losses[1:].view(self.queries, 2)
        return {"curvature": ((L[:, 0] + L[:, 1] - 2 * losses[0]).abs()
                              / (2 * eps * eps)).tolist()}
