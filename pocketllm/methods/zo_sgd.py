"""zo-sgd: MeZO's two-point SPSA estimate on the full weights or on LoRA (arXiv 2305.17333).

    g = (L(w + eps z) - L(w - eps z)) / (2 eps),   w <- w - lr g z,   z ~ N(0, I) from a seed

One query a step; its +eps/-eps passes run as one forward over the batch twice or as two
forwards (`--zo-passes`). The step itself is `methods/zo.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..memory_estimate import NoGradForward, UnknownShape, pair_passes_fit
from .base import register
from .zo import ZOConfig, ZOMethod


@dataclass
class ZOSGDConfig(ZOConfig):
    zo_passes: str = opt("auto", "ZO: 'pair' runs the +eps/-eps passes as one forward over the "
                         "batch twice (z generated once, the faster, measured); 'sequential' "
                         "runs two forwards (activations of one batch: the least memory); "
                         "'auto': pair unless its second batch of activations would add more "
                         "than 5 percent to the estimated peak at --batch-size x --max-seq-length "
                         "(LoRA: always pair)", choices=("auto", "pair", "sequential"))

    def queries_and_parallel(self, method) -> tuple[int, str]:
        """One query; its +eps/-eps passes as one forward over the batch twice (`pair`: z
        generated once instead of twice, and the 2x-batch forward costs no more than two
        forwards once freed activations stay in the heap, memory.tune_allocator; zo_step.md)
        or as two forwards (`sequential`: activations of one batch)."""
        return 1, "both" if self.pair(method.run, method.model.config) else "none"

    def pair(self, run, config=None, shape=None) -> bool:
        """Whether the +/- passes run as one forward: `auto` pairs unless that would cost
        more than 5% of memory (memory_estimate.pair_passes_fit, at --batch-size x
        --max-seq-length, from the model's `config` or its already built `shape`)."""
        if self.zo_passes != "auto":
            return self.zo_passes == "pair"
        try:
            return pair_passes_fit(config, run.trainable, run.batch_size, run.max_seq_length,
                                   run.dtype, run.lora_rank, list(run.lora_targets) or None,
                                   shape=shape)
        except UnknownShape:
            return run.trainable == "lora"  # a config the estimator cannot read


@register("zo-sgd")
class ZOSGD(ZOMethod):
    Config = ZOSGDConfig
    # MeZO (OPT-13B): full lr 1e-6..1e-7, eps 1e-3; LoRA lr 5e-5..1e-4, eps 1e-2, over 20k
    # steps. The default model is 100x smaller and a device run is a few hundred steps, so
    # larger steps; measured on SST-2 k=16 (benchmarks/results/sst2.md: LoRA lr 1e-3 had not
    # moved valid accuracy off 50% at step 50; 3e-3 constant reached 66% at step 100, then
    # diverged and ended at 47% dev; 3e-3 decaying linearly to 0 is stable) and on the demo's
    # completion loss (demo.md: 3e-4 learns, 1e-3 diverges at batch 8).
    # Perturbation: rademacher (+-1, the classic SPSA choice; E[z z^T] = I as for gaussian z)
    # over the full model, where z is generated for every weight twice a step and gaussian z
    # costs the kernel 2.5x more (zo_step.md); gaussian for LoRA, where z costs nothing.
    # norm, prefix: not yet measured on a task. A ZO step's noise grows with the coordinates
    # perturbed, so a set 4000x smaller than the model (norm: 35k numbers) takes a larger rate
    # than full's; eps as full's, the scales sitting near 1. Prefix: MeZO's prefix tuning
    # (OPT-13B) used lr 1e-3..1e-2 with eps 1e-1 on key/value prefixes; input embeddings are
    # about 10x smaller, so eps 1e-2.
    defaults = {"full": {"learning_rate": 1e-5, "eps": 1e-3, "perturbation": "rademacher"},
                "lora": {"learning_rate": 3e-4, "eps": 1e-2, "perturbation": "gaussian"},
                "lora:task": {"learning_rate": 3e-3, "lr_schedule": "linear"},
                "norm": {"learning_rate": 1e-3, "eps": 1e-3, "perturbation": "gaussian"},
                "prefix": {"learning_rate": 1e-3, "eps": 1e-2, "perturbation": "gaussian"}}
    defaults_from = ("benchmarks/results/sst2.md and demo.md (lr, eps: LoRA), zo_step.md "
                     "(the perturbation); norm and prefix: not measured on a task")
    trainable_kinds = ("full", "lora", "norm", "prefix")

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """No autograd over the batch twice (pair passes) or once (sequential), as --zo-passes
        picks them (auto: `pair_passes_fit` at this run's sizes), each replica with its own
        perturbed copies."""
        _, widest = cls.widest_pass(cfg, 1, "both" if cfg.pair(run, shape=shape) else "none")
        return NoGradForward(widest, perturbed=True, state=cls.kept_state(cfg),
                             what=f"zo-sgd {'pair' if widest == 2 else 'sequential'} passes")
