"""A device's side of a round: catch up on the log, probe the round's seeds on its own data,
report the scalars and a hash of its weights.

The estimate is the normal zeroth-order one (`ZOMethod.probe`: the run's estimator, engine,
perturbation and trainable set); the update is applied exactly as `zo.log.replay_steps`
applies a logged step (`optim.Estimate` of the round's keys and aggregated scalars, through
the run's ZO optimizer onto the tensors at once), so every device that applied the same
rounds holds the same weights bit for bit, whichever rounds it probed.

Pool candidate k stands for the keys of step k, query 0, in the key space (seed, run=1): a
device can draw (or precompute) z for every candidate before any round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..finite import NonFiniteError
from ..schedules import eps_at
from ..zo import optim
from ..zo.log import KeySpace
from .server import draw_seeds

POOL_RUN = 1  # the key space's run index for a federation's pool (0: a run on its own)
# ZO optimizers whose update is a function of the round's estimate alone: a device that
# rejoins needs no optimizer state, only the log (momentum / adam would carry theirs)
STATELESS = ("sgd", "sign-sgd")
# what a probe replies, by the server's rule (`aggregate.Rule.sends`): the ZOMethod's probe
# returning it (projected gradients, or the replicas' losses the server pools)
PROBES = {"grads": "probe", "losses": "probe_losses"}
# the run settings every device of a federation must share (the data and batch are its own)
SHARED = ("model", "dtype", "seed", "method", "trainable", "lora_rank", "lora_alpha",
          "lora_targets", "lora_layers", "num_virtual_tokens", "lora_fa")


def run_digest(args, cfg, pool: int, queries: int) -> str:
    """16 hex digits naming what must be equal on every device and the server."""
    shared = {k: getattr(args, k) for k in SHARED if hasattr(args, k)}
    text = json.dumps({"run": shared, "method": dataclasses.asdict(cfg), "pool": pool,
                       "queries": queries}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_method(method) -> None:
    """Refuse what a federation cannot keep identical on every device from the log alone."""
    if method.estimator.anchor_every:
        raise SystemExit(f"federate: --estimator {method.estimator.name} keeps an anchor a "
                         "rejoining device would not have; use spsa or fzoo")
    if method.perturbation.needs:
        raise SystemExit(f"federate: --zo-perturbation {method.perturbation.name} carries state "
                         "between rounds; use dense, sparse or lowrank")
    if method.opt.name not in STATELESS:
        raise SystemExit(f"federate: --zo-optimizer {method.opt.name} keeps state a rejoining "
                         f"device would lack; use {' or '.join(STATELESS)}")


def weights_hash(params) -> str:
    """sha256 over the trainable tensors' names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, p in params:
        t = p.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Device:
    """One device: a ZO method over its model's trainable tensors, its data (`batch_at`:
    round -> micro-batches; None: it only follows the log) and the rounds it has applied."""

    def __init__(self, method, batch_at, run: str, iters: int = 1, pool: int = 4096):
        check_method(method)
        self.method, self.batch_at, self.run, self.iters = method, batch_at, run, iters
        self.pool = pool  # --seed-pool: a round's seeds are drawn from it here, never sent
        self.params = method.params
        self.tensors = [p for _, p in self.params]
        self.space = KeySpace(method.run.seed, run=POOL_RUN)
        self.base = [t.detach().clone() for t in self.tensors]  # what a resync starts from
        self.have = 0  # rounds of the log applied

    # ---- the shared model -------------------------------------------------------------------
    def keys(self, seeds: list[int]) -> list[list]:
        pert, n = self.method.perturbation, len(self.tensors)
        return [pert.keys(self.space, int(k), 1, n)[0] for k in seeds]

    def seeds(self, rnd: int) -> list[int]:
        """Round `rnd`'s seeds, drawn as the server draws them."""
        return draw_seeds(self.method.run.seed, rnd, self.pool, self.method.queries)

    def hash(self) -> str:
        return weights_hash(self.params)

    def apply(self, rec: dict) -> None:
        """Apply round `rec` (its seeds, aggregated scalars, lr) as replay applies a step."""
        m = self.method
        seeds = rec["seeds"] if "seeds" in rec else self.seeds(rec["round"])  # (a log's: kept)
        est = optim.Estimate(self.keys(seeds), [float(g) for g in rec["grads"]],
                             m.cfg.perturbation, m.perturbation)
        target = optim.immediate(self.tensors, m.cfg.perturbation, m.perturbation)
        m.opt.apply(est, float(rec["lr"]), target, logged=rec)
        self.have += 1

    def reset(self) -> None:
        """Back to the base weights (to replay the log from round 0)."""
        with torch.no_grad():
            for t, b in zip(self.tensors, self.base):
                t.copy_(b)
        self.have = 0

    def catch_up(self, start: int, records: list[dict]) -> str | None:
        """Apply rounds start.. of `records` this device lacks. A device whose weights are not
        those the log says it should hold (the hash of the first round it would apply) starts
        over from the base model when the records begin at round 0. Returns why it cannot
        catch up, or None."""
        skip = self.have - start
        if skip < 0:
            return f"lacks rounds {self.have}..{start - 1}"
        if skip < len(records) and records[skip].get("hash") not in (None, self.hash()):
            if start != 0:
                self.have = 0  # tell the server to send the log from round 0
                return "weights out of step with the log; starting over from the base model"
            self.reset()
            skip = 0
        for rec in records[skip:]:
            self.apply(rec)
        return None

    # ---- a round ------------------------------------------------------------------------------
    def handle(self, req: dict) -> dict:
        """The reply to a server request (server.py describes both)."""
        if req.get("run") != self.run:
            return {"error": f"this device's settings differ from the federation's (digest "
                             f"{self.run} here, {req.get('run')} at the server)"}
        why = self.catch_up(int(req["from"]), list(req["catchup"]))
        if why is not None:
            return {"error": why, "have": self.have}
        rnd = int(req["round"])
        reply = {"round": rnd, "have": self.have, "hash": self.hash()}
        if not req["probe"]:  # a sync: up to date, nothing to probe
            return reply
        if self.batch_at is None:
            return {"error": "this device holds no training data", "have": self.have}
        sends = req.get("sends", "grads")
        if sends not in PROBES:
            return {"error": f"asked for {sends!r}; this device sends {', '.join(PROBES)}",
                    "have": self.have}
        eps = eps_at(self.method.cfg, rnd, self.iters)
        probe = getattr(self.method, PROBES[sends])
        try:
            values, loss, tokens = probe(self.batch_at(rnd), self.keys(self.seeds(rnd)), eps)
        except NonFiniteError as e:
            return {"error": f"round {rnd}: {e.what}", "have": self.have}
        return {**reply, sends: values, "loss": loss, "tokens": tokens}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """The trainable tensors and the rounds applied (a device that stops, then rejoins,
        replays the log from here)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: p.detach().contiguous() for n, p in self.params}, str(tmp),
                  metadata={"pocketllm_fed": json.dumps({"have": self.have, "run": self.run})})
        tmp.replace(path)

    def restore(self, path: str | Path) -> None:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pocketllm_fed", "{}"))
            if meta.get("run") != self.run:
                raise SystemExit(f"{path}: a checkpoint of another federation "
                                 f"({meta.get('run')} there, {self.run} here)")
            with torch.no_grad():
                for name, t in self.params:
                    t.copy_(f.get_tensor(name))
        self.have = int(meta["have"])
