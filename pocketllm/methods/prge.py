"""prge: P-RGE, q two-point queries per step as one batched forward (arXiv 2409.15520).

    g_hat = (1/q) sum_j (L(w + eps z_j) - L(w - eps z_j)) / (2 eps) z_j     over the LoRA tensors

With `--parallel both` (the default) the batch is repeated 2q times and replica (j, +/-) sees
its own perturbed adapter: one forward reads the frozen base once for all 2q losses, each LoRA
layer applying the replicas' adapters in one batched matmul (`LoRALinear.forward_groups`).
`--parallel none|inner|outer` computes the same estimate with more, smaller forwards (to
measure the speedup against itself), `--max-replicas R` caps the replicas per forward (memory),
`--lora-fa` perturbs and trains B only. The step, the optimizers and the log are zo-sgd's
(`methods/zo.py`): P-RGE is the same estimator with q queries and a parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..memory_estimate import NoGradForward
from ..zo.plan import PARALLEL
from .base import register
from .zo import ZOConfig, ZOMethod
from .zo_sgd import ZOSGD


@dataclass
class PRGEConfig(ZOConfig):
    queries: int = opt(1, "prge: perturbation queries q per step (the estimate averages q "
                       "two-point estimates)", ge=1)
    parallel: str = opt("both", "prge: which loops run as one batched forward: none (2q "
                        "forwards), inner (each query's +/- pair), outer (all queries of a "
                        "sign), both (one forward over the batch 2q times)",
                        choices=lambda: tuple(PARALLEL))

    def queries_and_parallel(self, method) -> tuple[int, str]:
        return self.queries, self.parallel


@register("prge")
class PRGE(ZOMethod):
    Config = PRGEConfig
    trainable_kinds = ("lora",)
    defaults = {k: v for k, v in ZOSGD.defaults.items() if k.startswith("lora")}

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """No autograd over 2q replicas of the batch in one forward (--parallel both), or fewer
        per forward (other --parallel modes, --max-replicas): the widest forward sets the
        activations, each of its replicas with its own perturbed adapter copy."""
        if cfg.queries < 1:
            raise ValueError(f"--queries must be at least 1, got {cfg.queries}")
        forwards, widest = cls.widest_pass(cfg, cfg.queries, cfg.parallel)
        return NoGradForward(widest, perturbed=True,
                             what=f"prge {cfg.queries} quer{'y' if cfg.queries == 1 else 'ies'} "
                                  f"(--parallel {cfg.parallel}), the widest of {forwards} "
                                  "forward(s)")
