"""hizoo: z scaled by a running diagonal estimate built from the loss's second difference
(HiZOO, Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed
Zeroth-Order Optimizer", arXiv 2402.15173; as its code, github.com/Yanjun-Zhao/HiZOO, does it):

    z = sqrt(S) * n(key)            (S: one float32 per coordinate, all 1 at the start)
    after the step (l_0, l^+, l^- of each query j, c_j = |l^+ + l^- - 2 l_0| / (2 eps^2)):
    S <- (1 - a) S + a * (1/q) sum_j c_j n_j^2 / S       (a = --hessian-smooth)

so S grows where the loss curves along the coordinates that were probed. It needs the
unperturbed loss l_0 besides the +/- pair: `--estimator hizoo` (2q + 1 replicas a step), which
reports c (the log's "curvature"); a replay rebuilds S from those logged figures, exactly.

Differences from the reference code: its update moves w along sqrt(S_new) n, S already updated
by the step's own losses; here the update is the probed z (sqrt(S_old) n), so that the update
is the direction whose losses were measured, and S is updated after it. (With the reference's
a of 1e-6 to 1e-8 the two agree to that order.) A query's c multiplies every coordinate's n^2:
with q queries their mean. Non-finite c (a diverged loss) leaves S as it is.

S is a float32 copy of every trainable tensor, like ZO-Adam's moments: meant for LoRA and the
other small trainable sets.
"""

from __future__ import annotations

import math

import torch

from .. import noise
from .base import Perturbation, register


@register("hizoo")
class HiZOO(Perturbation):
    flags = {"smooth": "hessian_smooth"}
    needs = ("curvature",)
    memory = (("hizoo curvature S and sqrt(S)", 2, "float32"),)

    def __init__(self, params=(), dist="gaussian", smooth: float = 1e-6):
        super().__init__(params, dist, smooth=smooth)
        self.S = [torch.ones(p.numel(), dtype=torch.float32) for p in self.params]
        self._sqrt = [torch.ones(p.numel(), dtype=torch.float32) for p in self.params]

    @classmethod
    def check(cls, smooth: float = 1e-6) -> None:
        if not 0.0 <= smooth < 1.0:
            raise ValueError(f"--hessian-smooth (the weight of a step's curvature in the "
                             f"running estimate) must be in [0, 1), got {smooth}")

    def z(self, i, key, w, start=0):
        n = noise.noise(key, start, w.numel(), self.dist)
        return (n * self._sqrt[i][start:start + w.numel()]).view(w.shape)

    def z_rows(self, i, key, w, rows):
        r = rows.reshape(-1)
        index = r[:, None] * w.shape[1] + torch.arange(w.shape[1], dtype=torch.int64)
        return noise.noise_at(key, index, self.dist) * self._sqrt[i][index]

    @torch.no_grad()
    def observe(self, keys, record):
        c = record["curvature"]
        a = self.settings["smooth"]
        if a == 0 or not all(math.isfinite(x) for x in c):
            return
        q = len(c)
        for i, S in enumerate(self.S):
            est = torch.zeros_like(S)
            for k, cj in zip(keys, c):
                est.add_(noise.noise(k[i], 0, S.numel(), self.dist).square_(), alpha=cj / q)
            est.div_(S)  # by the S the step was probed with
            S.mul_(1 - a).add_(est, alpha=a)
            torch.sqrt(S, out=self._sqrt[i])
