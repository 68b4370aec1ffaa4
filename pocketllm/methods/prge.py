"""prge: P-RGE, q two-point queries per step as one batched forward (arXiv 2409.15520).

    g_hat = (1/q) sum_j (L(w + eps z_j) - L(w - eps z_j)) / (2 eps) z_j     over the LoRA tensors

With `--parallel both` (the default) the batch is repeated 2q times and replica (j, +/-) sees
its own perturbed adapter: one forward reads the frozen base once for all 2q losses, each LoRA
layer applying the replicas' adapters in one batched matmul (`LoRALinear.forward_groups`).
`--parallel none|inner|outer` computes the same estimate with more, smaller forwards (to
measure the speedup against itself), `--max-replicas R` caps the replicas per forward (memory),
`--lora-fa` perturbs and trains B only. z_j is regenerated from (seed, step, j) and dropped
after the step; the update goes through `--zo-optimizer` and the log replays like zo-sgd's.
"""

from __future__ import annotations

from ..zo.estimate import plan_passes
from .base import register
from .zo_sgd import ZOSGD


@register("prge")
class PRGE(ZOSGD):
    trainable_kinds = ("lora",)
    defaults = {k: v for k, v in ZOSGD.defaults.items() if k.startswith("lora")}

    def plan(self, args) -> tuple[int, list]:
        return args.queries, plan_passes(args.queries, args.parallel, args.max_replicas)
