"""The ZO step log: a run's trained weights as seeds and coefficients, and its replay.

A zeroth-order step's update is a function of the perturbation keys and a few scalars (the
projected gradients, the lr, an optimizer's logged decision), so a run's `zo_log.jsonl` holds
one JSON line per step, a few dozen bytes: the base model plus that log rebuild the trained
weights and the ZO optimizer's state exactly (`pocketllm replay`, `--resume`).

    line 1     header: format, key space (seed, run, round, client), dist, trainable, dtype,
               params (the trainable tensors' names, in order), queries, optimizer (its spec),
               perturbation (its spec: how z is drawn per tensor; logs without one: dense)
    line t+2   step t: {"step": t, "projected_grads": [g_j per query], "lr": ..., ...}

An anchored estimator's records (svrg) say more: a refresh step has "refresh": true (the weights
before it are the anchor until the next one; its "lr" is the one applied), and every other step
"anchor": a and "anchor_grads": [a_j], the anchor's estimate it adds along step a's keys
(`estimate_of`: what every record applies).

Each line is flushed and fsynced as it is written, so a kill -9 loses at most the line being
written: a torn last line is dropped on reading, a corrupt line before it is an error.

Perturbation keys come from a `KeySpace`: query j of step t perturbs tensor i with
`derive_key(s, t, j * n + i)`, where s is the run seed itself for (run, round, client) =
(0, 0, 0), the keys of every log written before those existed, and otherwise a 64-bit mix of
all four, so that clients and rounds training one model together draw unrelated
perturbations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import noise, optim, perturbations

NAME = "zo_log.jsonl"
FORMAT = "pocketllm-zo-log/2"
# Formats this version reads, with the value of each header field they may lack (/1 had no
# key space beyond the seed, and its early logs no queries or optimizer).
READS = {"pocketllm-zo-log/1": {"queries": 1, "optimizer": {"name": "sgd"},
                                "run": 0, "round": 0, "client": 0, "estimator": "spsa",
                                "estimator_settings": {}, "perturbation": {"name": "dense"}},
         FORMAT: {"estimator": "spsa", "estimator_settings": {},
                  "perturbation": {"name": "dense"}}}
HEADER_FIELDS = ("seed", "run", "round", "client", "dist", "trainable", "dtype", "params",
                 "queries", "optimizer")
# what must match for `--resume` to continue a log (dtype may change: the log holds no weights)
SAME_RUN = ("seed", "dist", "trainable", "params", "queries", "optimizer",
            "run", "round", "client", "estimator", "estimator_settings", "perturbation")

_M64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class KeySpace:
    """Where a run's perturbation keys come from: its seed, and which run, round and client
    of a shared training it is (all 0 for a run on its own)."""

    seed: int
    run: int = 0
    round: int = 0
    client: int = 0

    def __post_init__(self):
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for f in ("run", "round", "client"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be an integer >= 0, got {v!r}")

    @classmethod
    def of(cls, header: dict) -> "KeySpace":
        """The key space a (normalised) log header names."""
        return cls(header["seed"], header["run"], header["round"], header["client"])

    def base(self) -> int:
        """The seed the keys are derived from: the run seed when run, round and client are 0
        (the keys of logs written before them, which must replay bit for bit), else a splitmix
        chain over all four, so that no two key spaces are related by arithmetic."""
        if (self.run, self.round, self.client) == (0, 0, 0):
            return self.seed
        x = 0
        for v in (self.seed, self.run, self.round, self.client):
            x = noise.splitmix64(x ^ v)
        return x

    def keys(self, step: int, queries: int, n_tensors: int) -> list[list[int]]:
        """keys[j][i]: the key of tensor i in query j of step `step`."""
        s = self.base()
        return [[noise.derive_key(s, step, j * n_tensors + i) for i in range(n_tensors)]
                for j in range(queries)]


def header(space: KeySpace, *, dist: str, trainable: str, dtype: str, params: list[str],
           queries: int, optimizer: dict, estimator: str = "spsa",
           estimator_settings: dict | None = None, perturbation: dict | None = None) -> dict:
    """The header line of a run's log (`estimator` and its own settings: what made its
    scalars; replay does not need them, `--resume` refuses to continue a log with others;
    `perturbation`: the spec of how z was drawn, default dense, which replay rebuilds)."""
    return {"format": FORMAT, **asdict(space), "estimator": estimator,
            "estimator_settings": dict(estimator_settings or {}), "dist": dist,
            "trainable": trainable, "dtype": dtype, "params": params, "queries": queries,
            "optimizer": optimizer, "perturbation": perturbation or {"name": "dense"}}


class ZOLog:
    """The step log of the run in `out_dir`: read it, continue it, append to it."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / NAME
        self._file = None

    def has_header(self) -> bool:
        """The log exists and its header line was written completely."""
        return self.path.exists() and b"\n" in self.path.read_bytes()

    def read(self) -> tuple[dict, list[dict]]:
        """The header (fields an older format lacks filled in) and the complete step records
        (a torn last line is ignored)."""
        lines = self.path.read_bytes().split(b"\n")
        if not lines[0]:
            raise SystemExit(f"{self.path}: empty ZO log")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            raise SystemExit(f"{self.path}:1: the header is not JSON") from None
        fmt = head.get("format") if isinstance(head, dict) else None
        if fmt not in READS:
            raise SystemExit(f"{self.path}: not a pocketllm ZO log this version reads "
                             f"(format {fmt!r}; reads {', '.join(READS)})")
        for k, v in READS[fmt].items():
            head.setdefault(k, v)
        missing = [k for k in HEADER_FIELDS if k not in head]
        if missing:
            raise SystemExit(f"{self.path}:1: header lacks {', '.join(missing)}")
        try:
            KeySpace.of(head)
        except ValueError as e:
            raise SystemExit(f"{self.path}:1: {e}") from None
        steps = []
        # the last element is what follows the final newline: empty, or a torn record
        for i, raw in enumerate(lines[1:-1], start=2):
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise SystemExit(f"{self.path}:{i}: corrupt record in the middle of the log") from None
            if not isinstance(rec, dict) or rec.get("step") != len(steps):
                got = rec.get("step") if isinstance(rec, dict) else rec
                raise SystemExit(f"{self.path}:{i}: step {got} out of order "
                                 f"(expected {len(steps)})")
            steps.append(rec)
        return head, steps

    def rewrite(self, head: dict, steps: list[dict]) -> None:
        """Replace the log by `head` and `steps`, atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for rec in [head, *steps]:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def start(self, head: dict, fresh: bool) -> None:
        """Open the log for appending; a fresh run (or one killed before its header was
        complete) starts it over with `head`."""
        if fresh or not self.has_header():
            self._file = open(self.path, "w")
            self.append(head)
        else:
            self._file = open(self.path, "a")

    def append(self, rec: dict) -> None:
        # flushed and fsynced: a kill -9 loses at most this line, torn, ignored on reading
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def truncate(self, steps: int) -> None:
        """Keep the header and the first `steps` records (closing the log if open): a run
        stopped by a non-finite value goes back to its last finite save."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.has_header():
            head, recs = self.read()
            self.rewrite(head, recs[:steps])

    def restore(self, mine: dict, params, opt: optim.ZOOptimizer,
                perturbation: perturbations.Perturbation | None = None,
                before_refresh: Callable[[dict], None] | None = None) -> int:
        """`--resume`: check that the log was written by this run (`mine`: its header), replay
        it onto `params` through `opt` with z drawn by `perturbation` (the run's, built on
        `params` before any step; None: one built from the header) and return the number of
        steps done (`before_refresh`: as for `replay_steps`)."""
        if not self.has_header():
            return 0  # killed before its header was complete: nothing was trained yet
        head, steps = self.read()
        for k in SAME_RUN:
            if head[k] != mine[k]:
                raise SystemExit(f"--resume: {self.path} was written by a different run "
                                 f"({k}: {head[k]!r} there, {mine[k]!r} now)")
        replay_log(head, steps, params, opt, perturbation, before_refresh)
        self.rewrite(head, steps)  # drops a torn last line so the appended log stays well formed
        return len(steps)


def replay_log(head: dict, steps: list[dict], params, opt: optim.ZOOptimizer | None = None,
               perturbation: perturbations.Perturbation | None = None,
               before_refresh: Callable[[dict], None] | None = None) -> None:
    """Replay a read log onto `params` ([(name, tensor)] in the header's order) through `opt`
    (default: a fresh one of the optimizer the header names), z drawn by `perturbation`
    (default: the one the header names, built on `params` as they are now: the base
    weights)."""
    tensors = [p for _, p in params]
    opt = opt or optim.build(head["optimizer"], tensors)
    if perturbation is None:
        try:
            perturbation = perturbations.build(head["perturbation"], tensors, head["dist"])
        except (ValueError, TypeError) as e:
            raise SystemExit(f"ZO log header: perturbation {head['perturbation']!r}: {e}") from None
    replay_steps(params, steps, KeySpace.of(head), head["dist"], opt, perturbation,
                 before_refresh)


def estimate_of(rec: dict, space: KeySpace, n_tensors: int,
                pert: perturbations.Perturbation) -> optim.Estimate:
    """The estimate step record `rec` applies, z drawn by `pert`: its projected grads along
    its step's keys and, after an anchored estimator's refresh, the anchor's along the refresh
    step's."""
    grads = rec.get("projected_grads") or [rec["projected_grad"]]
    keys = pert.keys(space, rec["step"], len(grads), n_tensors)
    if "anchor" not in rec:
        return optim.Estimate(keys, grads, pert.dist, pert)
    anchor = rec["anchor_grads"]
    keys = keys + pert.keys(space, rec["anchor"], len(anchor), n_tensors)
    return optim.Estimate(keys, grads + anchor, pert.dist, pert, queries=len(grads))


def replay_steps(params, steps: list[dict], seed: int | KeySpace, dist: str,
                 opt: optim.ZOOptimizer | None = None,
                 perturbation: perturbations.Perturbation | None = None,
                 before_refresh: Callable[[dict], None] | None = None) -> None:
    """Apply every logged update in order, through `opt` (default: sgd), whose state this
    rebuilds: the estimate of step t is regenerated from the key space (a bare seed: the run
    on its own) and its record (`estimate_of`), z drawn by `perturbation` (default: dense).
    `before_refresh(rec)` is called before an anchored estimator's refresh step is applied,
    when the weights are that refresh's anchor."""
    space = seed if isinstance(seed, KeySpace) else KeySpace(seed)
    tensors = [p for _, p in params]
    opt = opt or optim.build({"name": "sgd"}, tensors)
    pert = perturbation or perturbations.build({"name": "dense"}, tensors, dist)
    target = optim.immediate(tensors, dist, pert)
    for rec in steps:
        if rec.get("refresh") and before_refresh is not None:
            before_refresh(rec)
        est = estimate_of(rec, space, len(tensors), pert)
        opt.apply(est, rec["lr"], target, logged=rec)
        if pert.needs:  # its state, as the run moved it after this step's update
            missing = [f for f in pert.needs if f not in rec]
            if missing:
                raise SystemExit(f"ZO log: step {rec['step']} lacks {', '.join(missing)}, "
                                 f"which perturbation {pert.name} needs to be replayed")
            pert.observe(est.keys[:est.q], rec)  # the step's own keys
