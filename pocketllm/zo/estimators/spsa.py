"""spsa: the two-point estimate of MeZO (arXiv 2305.17333), averaged over q queries (P-RGE,
arXiv 2409.15520, with q > 1):

    g_j = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)

Replicas (j, +) and (j, -) are adjacent, so an engine can build a query's +/- copies of a
weight in one pass over it.
"""

from __future__ import annotations

import torch

from ..plan import Replica
from .base import Estimator, register


@register("spsa")
class SPSA(Estimator):
    def replicas(self) -> list[Replica]:
        return [Replica(j, s) for j in range(self.queries) for s in (1.0, -1.0)]

    def projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        return self.traced(losses, eps).tolist()

    def traced(self, losses, eps):
        L = losses.view(self.queries, 2)
        return (L[:, 0] - L[:, 1]) / (2 * eps)
