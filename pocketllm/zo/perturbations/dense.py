"""dense: every coordinate perturbed, z = the counter-based noise of the key over the whole
tensor (MeZO, arXiv 2305.17333). The default, and the only perturbation the fused noise kernel
(`zo/kernel.cpp`) builds: a +eps/-eps pair of copies in one pass over the weights, with the
previous step's update fused into it."""

from __future__ import annotations

import torch

from .. import noise
from .base import Perturbation, register


@register("dense")
class Dense(Perturbation):
    fused = True
    key_only = True

    def z(self, i, key, w, start=0):
        return noise.noise(key, start, w.numel(), self.dist).view(w.shape)

    def z_rows(self, i, key, w, rows):
        r = rows.reshape(-1)
        index = r[:, None] * w.shape[1] + torch.arange(w.shape[1], dtype=torch.int64)
        return noise.noise_at(key, index, self.dist)

    def add_(self, i, w, updates):
        for k, c in updates:
            noise.add_noise_(w, k, 0, c, self.dist)

    def perturb_pair(self, i, w, key, start, scale, out_plus, out_minus=None,
                     update_key=None, update_coef=0.0):
        noise.perturb_pair(w, key, start, scale, self.dist, out_plus, out_minus,
                           update_key=update_key, update_coef=update_coef)

    def perturb_rows(self, i, w, rows, key, scale, out):
        noise.perturb_rows(w, rows, key, scale, self.dist, out, None)
