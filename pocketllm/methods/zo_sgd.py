"""zo-sgd: MeZO's two-point SPSA estimate on the full weights or on LoRA, with a ZO optimizer.

    g = (L(w + eps z) - L(w - eps z)) / (2 eps),   w <- w - lr g z,   z ~ N(0, I) from a seed

Nothing of z is stored: it is regenerated from (run seed, step, parameter index). The step's
record (projected gradient, lr) goes to `zo_log.jsonl`, a few dozen bytes a step: the base
model plus that log rebuild the trained weights exactly (`pocketllm replay`), and it is also
what `--resume` replays after an interruption. `--zo-optimizer` picks the update rule
(`pocketllm.zo.optim`); stateful ones rebuild their state from the same log. The class is also
the multi-query estimator `prge` builds on (`queries` > 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loss import group_losses, n_scored
from ..memory_estimate import UnknownShape, pair_passes_fit
from ..schedules import eps_at
from ..zo import log as zolog
from ..zo import optim
from ..zo.estimate import plan_passes, replica_losses
from ..zo.perturb import Perturber
from .base import Method, StepResult, register


@register("zo-sgd")
class ZOSGD(Method):
    # MeZO (OPT-13B): full lr 1e-6..1e-7, eps 1e-3; LoRA lr 5e-5..1e-4, eps 1e-2, over 20k
    # steps. The default model is 100x smaller and a device run is a few hundred steps, so
    # larger steps; measured on SST-2 k=16 (benchmarks/results/sst2.md: LoRA lr 1e-3 had not
    # moved valid accuracy off 50% at step 50; 3e-3 constant reached 66% at step 100, then
    # diverged and ended at 47% dev; 3e-3 decaying linearly to 0 is stable) and on the demo's
    # completion loss (demo.md: 3e-4 learns, 1e-3 diverges at batch 8).
    # Perturbation: rademacher (+-1, the classic SPSA choice; E[z z^T] = I as for gaussian z)
    # over the full model, where z is generated for every weight twice a step and gaussian z
    # costs the kernel 2.5x more (zo_step.md); gaussian for LoRA, where z costs nothing.
    defaults = {"full": {"learning_rate": 1e-5, "eps": 1e-3, "perturbation": "rademacher"},
                "lora": {"learning_rate": 3e-4, "eps": 1e-2, "perturbation": "gaussian"},
                "lora:task": {"learning_rate": 3e-3, "lr_schedule": "linear"}}

    def __init__(self, model, params, args):
        super().__init__(model, params, args)
        for _, p in params:
            p.requires_grad_(False)  # no autograd anywhere: inference memory
        self.pert = Perturber(model, params, dist=args.perturbation)
        self.log = None  # the run's zolog.ZOLog once open_log is called
        self.key_space = zolog.KeySpace(args.seed)
        self.queries, self.passes = self.plan(args)
        self.opt = optim.build(optim.spec_from_args(args), [p for _, p in params])

    def plan(self, args) -> tuple[int, list]:
        """(queries, forward passes) of a step. One query, its +eps/-eps passes as one forward
        over the batch twice (`pair`: z generated once instead of twice, and the 2x-batch
        forward costs no more than two forwards once freed activations stay in the heap,
        memory.tune_allocator; zo_step.md) or as two forwards (`sequential`: activations of
        one batch). `auto` pairs unless that would cost more than 5% of memory
        (memory_estimate.pair_passes_fit, at --batch-size x --max-seq-length)."""
        pair = args.zo_passes == "pair"
        if args.zo_passes == "auto":
            try:
                pair = pair_passes_fit(self.model.config, args.trainable, args.batch_size,
                                       args.max_seq_length, args.dtype, args.lora_rank,
                                       list(args.lora_targets) or None)
            except UnknownShape:
                pair = args.trainable == "lora"  # a config the estimator cannot read
        return 1, plan_passes(1, "both" if pair else "none", args.max_replicas)

    def keys(self, step: int) -> list[list[int]]:
        return self.key_space.keys(step, self.queries, len(self.params))

    def step(self, batches, step, lr):
        eps, keys = eps_at(self.args, step), self.keys(step)
        diffs, losses, tokens = [], [], 0
        for b in batches:  # grad accumulation: the same z for every micro-batch
            L = replica_losses(self.model, self.pert, b, keys, eps, self.passes, self.stats)
            diffs.append((L[:, 0] - L[:, 1]) / (2 * eps))
            losses.append(L.mean().item())
            tokens += n_scored(b)
        grads = (sum(diffs) / len(diffs)).tolist()
        self._extra_fwd = 0
        target = optim.Target([p for _, p in self.params], self.pert.schedule_updates,
                              lambda: self._plain_loss(batches))
        # sgd: deferred, applied inside the next step's perturbation kernel (or at sync())
        extra = self.opt.step(optim.Estimate(keys, grads, self.args.perturbation), lr, target)
        g = sum(grads) / len(grads)
        loss = sum(losses) / len(losses)
        self._log({"step": step, "projected_grads": grads, "lr": lr, "eps": eps, "loss": loss,
                   **extra})
        return StepResult(loss=loss, tokens=tokens,
                          forward_passes=2 * self.queries * len(batches) + self._extra_fwd,
                          extra={"projected_grad": g, **extra})

    def _plain_loss(self, batches) -> float:
        """The loss at the current weights (pending updates applied), for `conservative`."""
        self.pert.flush()
        with torch.no_grad():
            ls = [group_losses(self.stats(self.model, b), 1).item() for b in batches]
        self._extra_fwd += len(batches)
        return sum(ls) / len(ls)

    def sync(self):
        self.pert.flush()

    # ---- the step log: reproducibility and resume (pocketllm.zo.log) ---------------------
    def header(self) -> dict:
        return zolog.header(self.key_space, dist=self.args.perturbation,
                            trainable=self.args.trainable, dtype=self.args.dtype,
                            params=[n for n, _ in self.params], queries=self.queries,
                            optimizer=self.opt.spec())

    def open_log(self, out_dir: Path, fresh: bool) -> None:
        self.log = zolog.ZOLog(out_dir)
        self.log.start(self.header(), fresh)

    def _log(self, rec: dict) -> None:
        if self.log is not None:
            self.log.append(rec)

    def restore(self, out_dir: Path) -> int:
        # rebuilds the weights and the optimizer's state
        return zolog.ZOLog(out_dir).restore(self.header(), self.params, self.opt)
