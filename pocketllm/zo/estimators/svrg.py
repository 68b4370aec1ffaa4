"""svrg: MeZO-SVRG's variance-reduced two-point estimate with a full-batch anchor (Gautam et al.,
"Variance-reduced Zeroth-Order Methods for Fine-Tuning Language Models", ICML 2024,
arXiv 2404.08080). With SPSA's g_I(w; z) = (L_I(w + eps z) - L_I(w - eps z)) / (2 eps) on a
batch I, the paper's update is

    every m steps (refresh):  a = g_all(w; z_a),  w_bar <- w,  w <- w - lr_1 a z_a
    otherwise:                w <- w - lr_2 [(g_I(w; z_t) - g_I(w_bar; z_t)) z_t + a z_a]

where `all` is the whole training set (at k = 16, 32 examples: a few micro-batches) and the
two minibatch estimates share the step's z_t, so the batch's own noise cancels in their
difference: near the anchor the step's estimate is the full-batch one, a z_a, whatever the
minibatch (its mean is still the gradient: E[g_I(w) - g_I(w_bar)] + grad f(w_bar) = grad f(w)).
The paper stores the full-batch estimate as a dense vector; here it is what it is, a z_a, so
each step applies it as one more seeded update along the refresh step's keys (logged with the
step: `--resume` and `pocketllm replay` rebuild the weights exactly). With q queries (prge's
--queries) every estimate averages q of them.

Costs: a step evaluates 4q replicas (the batch at w +- eps z_t and at w_bar +- eps z_t) in two
forwards with --parallel both (a forward sees one point: the current weights or the anchor's,
`plan.group_passes`), twice zo-sgd's; a refresh evaluates 2q over the whole training set. The
anchor w_bar is a copy of the trainable tensors, kept by the engine: the adapter's size for
LoRA (a few MB), a second copy of the model for --trainable full, which is refused.

`--anchor-every m` (the paper's q) and `--anchor-lr` (the refresh step's rate as a multiple of
the step's: the paper's lr_1 / lr_2, which it sets above 1) are zo-sgd / prge settings.
"""

from __future__ import annotations

import torch

from ..plan import Replica
from .base import Estimator, register
from .spsa import SPSA


@register("svrg")
class SVRG(Estimator):
    flags = {"anchor_every": "anchor_every", "anchor_lr": "anchor_lr"}
    memory = (("svrg anchor (Engine.keep_anchor)", 1, "param"),)

    def __init__(self, queries: int = 1, anchor_every: int = 5, anchor_lr: float = 1.0):
        super().__init__(queries)
        if anchor_every < 1:
            raise ValueError(f"--anchor-every must be at least 1 step, got {anchor_every}")
        if not anchor_lr > 0:
            raise ValueError(f"--anchor-lr must be positive, got {anchor_lr}")
        self.anchor_every, self.anchor_lr = int(anchor_every), float(anchor_lr)
        self.spsa = SPSA(queries)  # the refresh's estimate, and each point's on a step

    def replicas(self) -> list[Replica]:
        # the step's SPSA replicas at w, then the same ones (same keys) at the anchor
        plain = self.spsa.replicas()
        return plain + [Replica(r.query, r.sign, anchor=True) for r in plain]

    def projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        L = losses.view(2, self.queries, 2)          # (point: w, w_bar; query; sign)
        g = (L[:, :, 0] - L[:, :, 1]) / (2 * eps)    # SPSA's at each point, same z_t
        return (g[0] - g[1]).tolist()

    def refresh_replicas(self) -> list[Replica]:
        return self.spsa.replicas()

    def refresh_projected(self, losses: torch.Tensor, eps: float) -> list[float]:
        return self.spsa.projected(losses, eps)
