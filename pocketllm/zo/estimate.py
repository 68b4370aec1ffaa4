"""The forward passes of a multi-query ZO estimate, sequential or batched (P-RGE).

q queries, each a +eps/-eps pair, are 2q *replicas* of the batch: replica (j, s) sees every
trainable tensor as w + sign_s eps z_j. `plan_passes` groups the replicas into forward passes:

    none   2q forwards of the batch (one replica each)
    inner  q forwards of the batch twice (the +/- pair of one query)
    outer  2 forwards of the batch q times (all queries of one sign)
    both   1 forward of the batch 2q times (P-RGE: the frozen base is read once per step)

and `--max-replicas R` splits any pass into chunks of at most R replicas, trading speed for
activation memory. `replica_losses` runs them: one pass is one forward over the batch repeated
once per replica, each row group seeing its own perturbation (`Perturber.active` with one key
list per group; a LoRA layer applies the groups' adapters in one batched matmul). Whatever the
plan, the losses are the same up to floating-point rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..loss import group_losses, token_stats
from .perturb import Perturber

SIGNS = (1.0, -1.0)
Replica = tuple[int, int]  # (query j, sign index s)

PLANS = {
    "none": lambda q: [[(j, s)] for j in range(q) for s in (0, 1)],
    "inner": lambda q: [[(j, 0), (j, 1)] for j in range(q)],
    "outer": lambda q: [[(j, s) for j in range(q)] for s in (0, 1)],
    "both": lambda q: [[(j, s) for j in range(q) for s in (0, 1)]],
}


def plan_passes(queries: int, parallel: str, max_replicas: int = 0) -> list[list[Replica]]:
    """The forward passes (lists of replicas) computing `queries` two-point estimates."""
    if queries < 1:
        raise ValueError(f"--queries must be at least 1, got {queries}")
    if max_replicas < 0:
        raise ValueError(f"--max-replicas must be 0 (no cap) or positive, got {max_replicas}")
    if parallel not in PLANS:
        raise ValueError(f"--parallel {parallel!r}: choose one of {', '.join(PLANS)}")
    passes = PLANS[parallel](queries)
    if max_replicas:
        passes = [p[k:k + max_replicas] for p in passes for k in range(0, len(p), max_replicas)]
    return passes


def replica_losses(model: nn.Module, pert: Perturber, batch: dict[str, torch.Tensor],
                   keys: list[list[int]], eps: float, passes: list[list[Replica]],
                   stats=token_stats) -> torch.Tensor:
    """(q, 2) losses: [j, 0] at w + eps z_j, [j, 1] at w - eps z_j (keys[j]: query j's keys).
    `stats(model, batch, groups, head_view)` scores a batch (`token_stats` by default)."""
    out = torch.empty(len(keys), 2, dtype=torch.float64)
    for reps in passes:
        G = len(reps)
        # every tensor of a batch is per-row, so repeating it repeats the batch
        rep = batch if G == 1 else {k: v.repeat(G, *([1] * (v.dim() - 1)))
                                    for k, v in batch.items()}
        with pert.active([keys[j] for j, _ in reps], eps, [SIGNS[s] for _, s in reps],
                         rows=rep["input_ids"].shape[0]) as hc:
            losses = group_losses(stats(model, rep, G, hc), G).tolist()
        for (j, s), loss in zip(reps, losses):
            out[j, s] = loss
    return out
