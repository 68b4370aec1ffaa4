"""torch: eager PyTorch. The stored weights are never perturbed: each module that owns a
trainable tensor builds its perturbed copies just in time (`zo.perturb.Perturber`), one per
replica, and a forward over the batch repeated once per replica runs all of a pass's replicas
(LoRA layers in one batched matmul); layers below the first trainable one run once for all of
them (`zo.shared`), and with nothing in the backbone trained (`--trainable head`) each row's
hidden states are computed once and reused (`zo.feature_cache`). The SGD update is deferred
into the next step's perturbation kernel (z generated twice a step, not four times). Any
`--zo-perturbation`: the dense one through the fused kernel, the others through their own
code."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..loss import group_losses
from ..zo.perturb import Perturber
from ..zo.plan import Plan
from ..zo.feature_cache import FeatureCache, backbone_is_frozen
from ..zo.shared import first_trained_layer, shared_prefix
from .base import Engine, register


@register("torch")
class TorchEngine(Engine):
    def __init__(self, model, params, stats, dist="gaussian", perturbation=None):
        super().__init__(model, params, stats, dist, perturbation)
        self.pert = Perturber(model, params, dist=dist, perturbation=perturbation)
        # every replica computes the same layers below this one (None: no such layer)
        self.first = first_trained_layer(model, [n for n, _ in params])
        # nothing in the backbone trains (--trainable head): each row's hidden states once
        self.features = FeatureCache() if backbone_is_frozen(model, params) else None

    def losses(self, batch, plan: Plan) -> torch.Tensor:
        out = torch.empty(len(plan.replicas), dtype=torch.float64)
        for idx in plan.passes:
            G = len(idx)
            # every tensor of a batch is per-row, so repeating it repeats the batch
            rep = batch if G == 1 else {k: v.repeat(G, *([1] * (v.dim() - 1)))
                                        for k, v in batch.items()}
            reps = [plan.replicas[i] for i in idx]
            if len({r.anchor for r in reps}) > 1:
                raise ValueError("a forward pass mixes replicas at the anchor and at the current "
                                 "weights (plan.group_passes keeps them apart)")
            n = len(self.params)
            keys = [plan.keys[r.query] if r.query >= 0 else [0] * n for r in reps]
            point = self.at_anchor() if reps[0].anchor else nullcontext()
            if self.features is not None:
                share = self.features.serving(self.model, G)
            elif G > 1 and self.first is not None:
                share = shared_prefix(self.model, self.first, G)
            else:
                share = nullcontext()
            with point, share, self.pert.active(keys, plan.eps, [r.sign for r in reps],
                                         rows=rep["input_ids"].shape[0]) as head:
                losses = group_losses(self.stats(self.model, rep, G, head), G).tolist()
            for i, loss in zip(idx, losses):
                out[i] = loss
        return out

    def loss(self, batch) -> float:
        self.pert.flush()
        with torch.no_grad():
            return group_losses(self.stats(self.model, batch), 1).item()

    def scorer(self, repeated: bool = False):
        """A split scored again and again (valid) over a frozen backbone: each row's hidden
        states from the feature cache (computed once, alone), the head applied at the current
        weights. A split scored once (the final test) runs whole, kept out of the cache."""
        if self.features is None or not repeated:
            return None

        def score(batch):
            with self.features.serving(self.model, 1):
                return self.stats(self.model, batch)
        return score

    def apply(self, updates) -> None:
        self.pert.schedule_updates(updates)

    def sync(self) -> None:
        self.pert.flush()
