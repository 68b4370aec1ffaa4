"""The zeroth-order step log: one (seed, projected gradients) record per step, and its replay.

(Temporary home; see the zolog branch.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import optim

LOG_NAME = "zo_log.jsonl"
LOG_FORMAT = "pocketllm-zo-log/1"
# header fields of logs written before they existed
LOG_DEFAULTS = {"queries": 1, "optimizer": {"name": "sgd"}}


class ZOLog:
    """An open step log: a header line, then one fsynced JSON line per step."""

    def __init__(self, path: Path, header: dict, fresh: bool):
        self.path = Path(path)
        if fresh or not has_header(self.path):
            self.file = open(self.path, "w")
            self.append({"format": LOG_FORMAT, **header})
        else:
            self.file = open(self.path, "a")

    def append(self, rec: dict) -> None:
        # One line per step, flushed and fsynced: a kill -9 loses at most the line being
        # written, and a torn last line is ignored on resume.
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def restore(path: Path, mine: dict, params, opt) -> int:
    """Replay the log at `path` onto `params` through `opt` (rebuilding its state) after
    checking it was written by a run like this one (`mine`: this run's header); returns the
    number of steps it holds (0: no complete header yet, nothing was trained)."""
    path = Path(path)
    if not has_header(path):
        return 0  # killed before its header was complete: nothing was trained yet
    header, steps = read_log(path)
    for k in ("seed", "dist", "trainable", "params", "queries", "optimizer"):
        there = header.get(k, LOG_DEFAULTS.get(k))
        if there != mine[k]:
            raise SystemExit(f"--resume: {path} was written by a different run "
                             f"({k}: {there!r} there, {mine[k]!r} now)")
    replay_steps(params, steps, header["seed"], header["dist"], opt)
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
        opt.apply(optim.Estimate(keys, grads, dist), rec["lr"], target, logged=rec)
