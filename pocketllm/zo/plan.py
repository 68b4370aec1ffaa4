"""What a zeroth-order step asks an engine to evaluate: replicas of the batch, grouped into
forward passes.

A *replica* is one copy of the batch seen through perturbed weights, w + scale * z(keys[query])
(scale = sign * eps; query -1 is the unperturbed model), where w is the current weights or, for
an anchored estimator (svrg), the anchor: the weights as they were at its last refresh. An estimator lists the replicas it
needs (`Estimator.replicas`); `group_passes` groups them into forward passes, each one forward
over the batch repeated once per replica (P-RGE, arXiv 2409.15520):

    none   one forward per replica
    inner  the replicas of one query together (a +/- pair)
    outer  the replicas of one sign together (all queries of a sign)
    both   every replica in one forward: the frozen base is read once per step

and `max_replicas` splits any pass into chunks of at most that many replicas, trading speed for
activation memory. A pass sees one point: replicas at the anchor never share a forward with
replicas at the current weights (they are grouped apart, the current ones first). Whatever the grouping, the losses are the same up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Replica:
    query: int     # index into the step's key lists; -1: unperturbed
    sign: float    # +1 / -1 (0 for the unperturbed replica)
    anchor: bool = False  # perturb the anchor's weights instead of the current ones


@dataclass
class Plan:
    """A step's forward passes: `passes[p]` lists indices into `replicas`; query j perturbs
    trainable tensor i with key `keys[j][i]`, scaled by `eps`."""

    keys: list[list[int]]
    eps: float
    replicas: list[Replica]
    passes: list[list[int]]


def _by(key: Callable[[Replica], object]) -> Callable[[list[Replica]], list[list[int]]]:
    def group(replicas: list[Replica]) -> list[list[int]]:
        out: dict[object, list[int]] = {}
        for i, r in enumerate(replicas):
            out.setdefault(key(r), []).append(i)
        return list(out.values())
    return group


# --parallel: how replicas share a forward (a dict: the flag's choices come from it)
PARALLEL: dict[str, Callable[[list[Replica]], list[list[int]]]] = {
    "none": lambda reps: [[i] for i in range(len(reps))],
    "inner": _by(lambda r: r.query),
    "outer": _by(lambda r: r.sign),
    "both": lambda reps: [list(range(len(reps)))],
}


def group_passes(replicas: list[Replica], parallel: str, max_replicas: int = 0
                 ) -> list[list[int]]:
    """The forward passes (lists of replica indices) that evaluate `replicas`."""
    if max_replicas < 0:
        raise ValueError(f"--max-replicas must be 0 (no cap) or positive, got {max_replicas}")
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel {parallel!r}: choose one of {', '.join(PARALLEL)}")
    passes = []
    for at_anchor in (False, True):  # a forward sees one point: the current weights or the anchor
        idx = [i for i, r in enumerate(replicas) if r.anchor == at_anchor]
        if idx:
            passes += [[idx[k] for k in p] for p in PARALLEL[parallel]([replicas[i] for i in idx])]
    if max_replicas:
        passes = [p[k:k + max_replicas] for p in passes for k in range(0, len(p), max_replicas)]
    return passes
