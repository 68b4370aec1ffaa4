"""The reference MeZO step, as the original code does it (princeton-nlp/MeZO's trainer).

Perturb the stored weights in place (+eps z), forward, (-2 eps z), forward, (+eps z) to restore,
then the update (-lr g z): z regenerated with per-tensor `torch.normal` four times a step. Kept
only as the baseline the benchmarks (the workload's naive-zo modes) and drift tests compare
against.
"""

from __future__ import annotations

import torch


def _walk(params, seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype)
        p.data.add_(z, alpha=scale)


@torch.no_grad()
def naive_zo_step(params, loss_fn, eps: float, lr: float, seed: int) -> float:
    """One MeZO step in place; returns the projected gradient."""
    _walk(params, seed, eps)
    lp = float(loss_fn())
    _walk(params, seed, -2 * eps)
    lm = float(loss_fn())
    _walk(params, seed, eps)
    g = (lp - lm) / (2 * eps)
    _walk(params, seed, -lr * g)
    return g
