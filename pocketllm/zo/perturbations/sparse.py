"""sparse: perturb and update only each tensor's small-magnitude coordinates (Sparse-MeZO, Liu
et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning",
arXiv 2402.15751):

    m = 1[|w| <= h_i],   z = m * n(key),   w +- eps z,   w <- w - lr g z   (the same mask)

The paper finds the ZO estimate's noise does more harm added to large weights than to small
ones, and perturbs a tensor's coordinates whose magnitude is at most a per-tensor threshold h_i.
Here h_i is fixed when training starts, the (1 - sparsity) quantile of |w_i| (so `--sparsity`
0.75 perturbs the smallest quarter), and the mask is computed on the fly from the weights as
they are at each step, elementwise, as the paper's memory-efficient version does: no mask is
stored (a threshold per tensor), and any slice of a tensor (a chunk of the output head, an
embedding row) gets its mask from its own weights. A step's update is drawn with the mask of
the weights it was probed at (`Perturbation.add_`), so it moves only coordinates that were
perturbed. Replay rebuilds the thresholds from the base weights and the masks from the
replayed weights, exactly.

With a stateful ZO optimizer (momentum, adam) the moments are built from masked z's, so a
coordinate moves only once some step's mask has held it.

On a LoRA adapter the magnitude rule sees B = 0 at the start (so all of B is under the
threshold) and perturbs the small entries of A; Sparse-MeZO is a full-parameter method.
"""

from __future__ import annotations

import torch

from .. import noise
from .base import Perturbation, register


@register("sparse")
class Sparse(Perturbation):
    flags = {"sparsity": "sparsity"}

    def __init__(self, params=(), dist="gaussian", sparsity: float = 0.75):
        super().__init__(params, dist, sparsity=sparsity)
        # h_i: the k-th smallest |w| with k the number of coordinates perturbed (ties at h are
        # perturbed too: a tensor of zeros is perturbed whole)
        self.h = []
        for p in self.params:
            a = p.detach().reshape(-1).float().abs()
            k = max(1, round((1.0 - sparsity) * a.numel()))
            self.h.append(a.kthvalue(k).values.item())

    @classmethod
    def check(cls, sparsity: float = 0.75) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"--sparsity is the fraction of each tensor's coordinates left "
                             f"unperturbed, in [0, 1), got {sparsity}")

    def mask(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """Which coordinates of `w` (tensor i or a slice of it, the current weights) z moves."""
        return w.float().abs() <= self.h[i]

    def z(self, i, key, w, start=0):
        return noise.noise(key, start, w.numel(), self.dist).view(w.shape) * self.mask(i, w)

    def z_rows(self, i, key, w, rows):
        r = rows.reshape(-1)
        index = r[:, None] * w.shape[1] + torch.arange(w.shape[1], dtype=torch.int64)
        return noise.noise_at(key, index, self.dist) * self.mask(i, w[r])
