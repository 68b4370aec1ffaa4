"""zo-sgd: MeZO's two-point SPSA estimate with plain SGD, on the full weights or on LoRA.

    g = (L(w + eps z) - L(w - eps z)) / (2 eps),   w <- w - lr g z,   z ~ N(0, I) from a seed

Nothing of z is stored: it is regenerated from (run seed, step, parameter index). The step's
record (seed, projected gradient, coefficient) goes to `zo_log.jsonl`, a few dozen bytes a step:
the base model plus that log rebuild the trained weights exactly (`pocketllm replay`), and it is
also what `--resume` replays after an interruption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..loss import group_losses, n_scored
from ..zo import noise
from ..zo.perturb import Perturber
from .base import Method, StepResult, register

LOG_NAME = "zo_log.jsonl"
LOG_FORMAT = "pocketllm-zo-log/1"


@register("zo-sgd")
class ZOSGD(Method):
    # MeZO (OPT-13B): full lr 1e-6..1e-7, eps 1e-3; LoRA lr 5e-5..1e-4, eps 1e-2, over 20k
    # steps. The default model is 100x smaller and a device run is a few hundred steps, so
    # larger steps; measured on SST-2 k=16 (benchmarks/results/sst2.md: LoRA lr 1e-3 had not
    # moved valid accuracy off 50% at step 50, 3e-3 had) and on the demo's completion loss
    # (demo.md: 3e-4 learns, 1e-3 diverges at batch 8).
    defaults = {"full": {"learning_rate": 1e-5, "eps": 1e-3},
                "lora": {"learning_rate": 3e-4, "eps": 1e-2},
                "lora:task": {"learning_rate": 3e-3}}

    def __init__(self, model, params, args):
        super().__init__(model, params, args)
        for _, p in params:
            p.requires_grad_(False)  # no autograd anywhere: inference memory
        self.pert = Perturber(model, params, dist=args.perturbation)
        self.log_file = None
        # On the full model the 2x-batch forward costs more than two forwards on this kind of
        # CPU (benchmarks/results/zo_step*.md); with LoRA the shared base makes pairing free.
        passes = args.zo_passes
        self.pair = passes == "pair" or (passes == "auto" and args.trainable == "lora")

    def keys(self, step: int) -> list[int]:
        return [noise.derive_key(self.args.seed, step, i) for i in range(len(self.params))]

    def step(self, batches, step, lr):
        eps, keys = self.args.eps, self.keys(step)
        grads, losses, tokens = [], [], 0
        for b in batches:  # grad accumulation: the same z for every micro-batch
            if self.pair:
                # +eps and -eps as one forward: the batch twice, one row group per sign
                pair = {k: torch.cat([v, v]) for k, v in b.items()}
                with self.pert.active(keys, eps, (1.0, -1.0), rows=pair["input_ids"].shape[0]) as hc:
                    lp, lm = group_losses(self.stats(self.model, pair, 2, hc), 2).tolist()
            else:
                lp, lm = (self._single(b, keys, eps, s) for s in (1.0, -1.0))
            grads.append((lp - lm) / (2 * eps))
            losses.append((lp + lm) / 2)
            tokens += n_scored(b)
        g = sum(grads) / len(grads)
        coef = -lr * g
        # Deferred: applied inside the next step's perturbation kernel (or at sync()).
        self.pert.schedule_update(keys, coef)
        self._log({"step": step, "projected_grad": g, "coef": coef, "lr": lr,
                   "loss": sum(losses) / len(losses)})
        return StepResult(loss=sum(losses) / len(losses), tokens=tokens,
                          forward_passes=2 * len(batches), extra={"projected_grad": g, "coef": coef})

    def _single(self, b, keys, eps, sign) -> float:
        with self.pert.active(keys, eps, (sign,), rows=b["input_ids"].shape[0]) as hc:
            return group_losses(self.stats(self.model, b, 1, hc), 1).item()

    def sync(self):
        self.pert.flush()

    # ---- the step log: reproducibility and resume ----------------------------------------
    def header(self) -> dict:
        return {"format": LOG_FORMAT, "seed": self.args.seed, "dist": self.args.perturbation,
                "trainable": self.args.trainable, "dtype": self.args.dtype,
                "params": [n for n, _ in self.params]}

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
        for k in ("seed", "dist", "trainable", "params"):
            if header.get(k) != mine[k]:
                raise SystemExit(f"--resume: {path} was written by a different run "
                                 f"({k}: {header.get(k)!r} there, {mine[k]!r} now)")
        replay_steps(self.params, steps, header["seed"], header["dist"])
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


def replay_steps(params, steps: list[dict], seed: int, dist: str) -> None:
    """Apply every logged update in order: w += coef_t * z(seed, t, i)."""
    with torch.no_grad():
        for rec in steps:
            for i, (_, p) in enumerate(params):
                noise.add_noise_(p.data, noise.derive_key(seed, rec["step"], i), 0,
                                 rec["coef"], dist)
