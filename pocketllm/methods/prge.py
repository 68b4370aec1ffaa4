"""prge: q perturbation queries a step in one batched forward (P-RGE, arXiv 2409.15520); by default FZOO's normalised estimate, q=8 (the zeroth-order default).

With `--estimator spsa` (P-RGE's own two-point estimate):

    g_hat = (1/q) sum_j (L(w + eps z_j) - L(w - eps z_j)) / (2 eps) z_j     over the LoRA tensors

by default `--estimator fzoo` (estimators/fzoo.py): q one-sided queries and one unperturbed
loss, the step divided by the spread of the q losses.

With `--parallel both` (the default) the batch is repeated 2q times and replica (j, +/-) sees
its own perturbed adapter: one forward reads the frozen base once for all 2q losses, each LoRA
layer applying the replicas' adapters in one batched matmul (`LoRALinear.forward_groups`).
`--parallel none|inner|outer` computes the same estimate with more, smaller forwards (to
measure the speedup against itself), `--max-replicas R` caps the replicas per forward (memory),
`--lora-fa` perturbs and trains B only. `--trainable norm` (torch engine) gives each replica
its own copy of the norm scales instead; with `--norm-layers 0` only the final norm's. The
step, the optimizers and the log are zo-sgd's (`methods/zo.py`): P-RGE is the same estimator
with q queries and a parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..memory_estimate import NoGradForward
from ..zo import estimators
from ..zo.plan import PARALLEL
from .base import register
from .zo import ZOConfig, ZOMethod


@dataclass
class PRGEConfig(ZOConfig):
    # FZOO by default: the estimate that won the few-shot protocol (see PRGE.defaults_from)
    estimator: str = opt("fzoo", "ZO gradient estimator (pocketllm/zo/estimators)",
                         choices=lambda: tuple(estimators.REGISTRY))
    queries: int = opt(8, "prge: perturbation queries q per step (the estimate averages the "
                       "q queries' estimates)", ge=1)
    parallel: str = opt("both", "prge: which loops run as one batched forward: none (2q "
                        "forwards), inner (each query's +/- pair), outer (all queries of a "
                        "sign), both (one forward over the batch 2q times)",
                        choices=lambda: tuple(PARALLEL))

    def queries_and_parallel(self, method) -> tuple[int, str]:
        return self.queries, self.parallel


@register("prge")
class PRGE(ZOMethod):
    Config = PRGEConfig
    trainable_kinds = ("lora", "norm", "head")
    # FZOO's normalised step (estimators/fzoo.py): lr is a step length, the same for the
    # demo's completion loss and a task's label loss. Its length does not shrink as the
    # gradient does, so on a task it decays linearly to 0 by the run's end (--iters or
    # --time-budget, whichever stops it): at a constant 1e-2 the train loss climbs back after
    # ~500 steps and the run over-fits (accuracy_protocol_10min.md). eps 1e-3 with
    # Rademacher u, as the paper; q=8 queries of --batch-size 2 in one forward.
    # --trainable norm (576 numbers with --norm-layers 0): the same step length measured best
    # of 1e-2 / 5e-2 on SST-2 (accuracy_explore_s42.md). --trainable head (the answer rows'
    # offsets): 1e-2 on the demo's notes, where 3e-2 and 1e-1 over-shoot (demo.md)
    defaults = {"lora": {"learning_rate": 1e-2, "eps": 1e-3, "perturbation": "rademacher"},
                "lora:task": {"learning_rate": 1e-2, "lr_schedule": "linear"},
                "norm": {"learning_rate": 1e-2, "eps": 1e-3, "perturbation": "rademacher"},
                "norm:task": {"learning_rate": 1e-2, "lr_schedule": "linear"},
                "head": {"learning_rate": 1e-2, "eps": 1e-3, "perturbation": "rademacher"},
                "head:task": {"learning_rate": 1e-2, "lr_schedule": "linear"}}
    defaults_from = ("benchmarks/results/accuracy_protocol_10min.md (SST-2 k=16, five seeds, "
                     "10 CPU-minutes: 76.1% decaying linearly against 72.7% at a constant lr, "
                     "zo-sgd's 69.4% and lora-adam's 78.8%; lr 2e-2 over-fits, seed 42) and "
                     "fzoo_sst2.md (lr 1e-2 learns, 3e-2 over-fits); the demo (demo.md); "
                     "norm: accuracy_explore_s42.md (the final norm alone, SST-2 seed 42, "
                     "10 CPU-minutes: lr 1e-2 70.9%, 5e-2 68.8%); head: demo.md (the demo's "
                     "notes: lr 1e-2 learns, 3e-2 and 1e-1 over-shoot; 16 queries of 8 notes, "
                     "1200 steps: test exact match 88.3%)")

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """No autograd over 2q replicas of the batch in one forward (--parallel both), or fewer
        per forward (other --parallel modes, --max-replicas): the widest forward sets the
        activations, each of its replicas with its own perturbed adapter copy."""
        if cfg.queries < 1:
            raise ValueError(f"--queries must be at least 1, got {cfg.queries}")
        forwards, widest = cls.widest_pass(cfg, cfg.queries, cfg.parallel)
        return NoGradForward(widest, perturbed=True, state=cls.kept_state(cfg),
                             what=f"prge {cfg.queries} quer{'y' if cfg.queries == 1 else 'ies'} "
                                  f"(--parallel {cfg.parallel}), the widest of {forwards} "
                                  "forward(s)")
