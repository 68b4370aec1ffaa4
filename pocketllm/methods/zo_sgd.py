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

import json
import os
from pathlib import Path

import torch

from ..loss import group_losses, n_scored
from ..memory_estimate import UnknownShape, pair_passes_fit
from ..schedules import eps_at
from ..zo import optim
from ..zo.estimate import plan_passes, replica_losses
from ..zo.perturb import Perturber
from .base import Method, StepResult, register

LOG_NAME = "zo_log.jsonl"
LOG_FORMAT = "pocketllm-zo-log/1"
# header fields of logs written before they existed
LOG_DEFAULTS = {"queries": 1, "optimizer": {"name": "sgd"}}


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
        self.log_file = None
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
        return optim.query_keys(self.args.seed, step, self.queries, len(self.params))

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

    # ---- the step log: reproducibility and resume ----------------------------------------
    def header(self) -> dict:
        return {"format": LOG_FORMAT, "seed": self.args.seed, "dist": self.args.perturbation,
                "trainable": self.args.trainable, "dtype": self.args.dtype,
                "params": [n for n, _ in self.params], "queries": self.queries,
                "optimizer": self.opt.spec()}

    def open_log(self, out_dir: Path, fresh: bool) -> None:
        path = Path(out_dir) / LOG_NAME
        if fresh or not has_header(path):
            self.log_file = open(path, "w")
            self._write(self.header())
        else:
            self.log_file = open(path, "a")

    def _log(self, rec: dict) -> None:
        if self.log_file is not None:
            self._write(rec)

    def _write(self, rec: dict) -> None:
        # One line per step, flushed and fsynced: a kill -9 loses at most the line being
        # written, and a torn last line is ignored on resume.
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        os.fsync(self.log_file.fileno())

    def restore(self, out_dir: Path) -> int:
        path = Path(out_dir) / LOG_NAME
        if not has_header(path):
            return 0  # killed before its header was complete: nothing was trained yet
        header, steps = read_log(path)
        mine = self.header()
        for k in ("seed", "dist", "trainable", "params", "queries", "optimizer"):
            there = header.get(k, LOG_DEFAULTS.get(k))
            if there != mine[k]:
                raise SystemExit(f"--resume: {path} was written by a different run "
                                 f"({k}: {there!r} there, {mine[k]!r} now)")
        # rebuilds the weights and the optimizer's state
        replay_steps(self.params, steps, header["seed"], header["dist"], self.opt)
        # drop a torn last line so the appended log stays well formed
        rewrite_log(path, header, steps)
        return len(steps)


def has_header(path: Path) -> bool:
    """The log exists and its header line was written completely."""
    return path.exists() and b"\n" in path.read_bytes()


def read_log(path: Path) -> tuple[dict, list[dict]]:
    """The header and the complete step records of a zo log (a torn last line is ignored)."""
    lines = Path(path).read_bytes().split(b"\n")
    if not lines or not lines[0]:
        raise SystemExit(f"{path}: empty ZO log")
    header = json.loads(lines[0])
    if header.get("format") != LOG_FORMAT:
        raise SystemExit(f"{path}: not a pocketllm ZO log (format {header.get('format')!r})")
    steps = []
    # the last element is what follows the final newline: empty, or a torn record
    for i, raw in enumerate(lines[1:-1], start=2):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            raise SystemExit(f"{path}:{i}: corrupt record in the middle of the log") from None
        if rec["step"] != len(steps):
            raise SystemExit(f"{path}:{i}: step {rec['step']} out of order")
        steps.append(rec)
    return header, steps


def rewrite_log(path: Path, header: dict, steps: list[dict]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for rec in [header, *steps]:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replay_steps(params, steps: list[dict], seed: int, dist: str,
                 opt: optim.ZOOptimizer | None = None) -> None:
    """Apply every logged update in order, through `opt` (default: sgd), whose state this
    rebuilds: the estimate of step t is regenerated from (seed, t) and its projected grads."""
    tensors = [p for _, p in params]
    opt = opt or optim.build({"name": "sgd"}, tensors)
    target = optim.immediate(tensors, dist)
    for rec in steps:
        grads = rec.get("projected_grads") or [rec["projected_grad"]]
        keys = optim.query_keys(seed, rec["step"], len(grads), len(tensors))
        opt.step(optim.Estimate(keys, grads, dist), rec["lr"], target, logged=rec)
