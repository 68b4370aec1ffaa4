"""lowrank: each matrix perturbed along a random rank-r direction in a subspace that changes every
k steps (LOZO, Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with
Low-rank Structures", arXiv 2410.07698; SubZero, arXiv 2410.08989, is the same idea with
orthonormal projections):

    W (m x n):  z = U V^T / sqrt(r),  U (m x r) drawn per step and query,
                V (n x r) drawn once per window of `--lowrank-refresh` steps (LOZO's lazy
                sampling: the iterates move within one subspace before it is refreshed)
    any other tensor (biases, norms): dense z

U and V are the counter-based noise of their own keys (`zo.noise`), so nothing is stored but a
V per matrix (n x r floats, cached); the key of tensor i is the pair (U's key, V's key), U's
the run's usual key of (step, query, tensor), V's derived from the run's key space and
step // refresh, shared by the step's queries. The 1/sqrt(r) makes E[z z^T] = I when V is
drawn afresh, as for dense z, so lr and eps mean what they mean for dense (LOZO's code uses
U V^T unscaled: its eps is this eps / sqrt(r), its lr this lr / r). Within a window the
estimate is the gradient projected onto the window's subspace (E[z z^T | V] = V V^T / r on
each row), which is what makes it low-variance: a matrix's update is rank <= r per step.
"""

from __future__ import annotations

import math

import torch

from .. import noise
from .base import Perturbation, register

_V_SALT = 0x4C4F5A4F5F56  # "LOZO_V": V's keys come from a stream unrelated to U's


@register("lowrank")
class LowRank(Perturbation):
    flags = {"rank": "lowrank_rank", "refresh": "lowrank_refresh"}
    key_only = True

    def __init__(self, params=(), dist="gaussian", rank: int = 2, refresh: int = 50):
        super().__init__(params, dist, rank=rank, refresh=refresh)
        self.rank, self.refresh = rank, refresh
        self._v: dict[int, tuple[int, torch.Tensor]] = {}  # tensor -> (V's key, V / sqrt(r))

    @classmethod
    def check(cls, rank: int = 2, refresh: int = 50) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"--lowrank-rank must be an integer >= 1, got {rank}")
        if not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"--lowrank-refresh (steps a subspace is kept) must be an integer "
                             f">= 1, got {refresh}")

    def keys(self, space, step, queries, n):
        v_base = noise.splitmix64(space.base() ^ _V_SALT)
        v = [noise.derive_key(v_base, step // self.refresh, i) for i in range(n)]
        return [[(u, v[i]) for i, u in enumerate(row)] for row in space.keys(step, queries, n)]

    def _scaled_v(self, i: int, v_key: int, cols: int) -> torch.Tensor:
        got = self._v.get(i)
        if got is None or got[0] != v_key:
            V = noise.noise(v_key, 0, cols * self.rank, self.dist).view(cols, self.rank)
            got = (v_key, V * torch.tensor(1.0 / math.sqrt(self.rank), dtype=torch.float32))
            self._v[i] = got
        return got[1]

    def z(self, i, key, w, start=0):
        u_key, v_key = key
        shape = self.params[i].shape if self.params else w.shape
        if len(shape) != 2:
            return noise.noise(u_key, start, w.numel(), self.dist).view(w.shape)
        m, n = shape
        if start % n or w.numel() % n:
            raise ValueError(f"lowrank z: a slice of tensor {i} must be whole rows of {n}")
        r0, rows = start // n, w.numel() // n
        U = noise.noise(u_key, r0 * self.rank, rows * self.rank, self.dist).view(rows, self.rank)
        return (U @ self._scaled_v(i, v_key, n).T).view(w.shape)

    def z_rows(self, i, key, w, rows):
        u_key, v_key = key
        r = rows.reshape(-1)
        index = r[:, None] * self.rank + torch.arange(self.rank, dtype=torch.int64)
        return noise.noise_at(u_key, index, self.dist) @ self._scaled_v(i, v_key, w.shape[1]).T
