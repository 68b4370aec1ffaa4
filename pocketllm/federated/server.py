"""The server's side of a round, as plain functions of dicts (Flower carries them: app.py).

    request(node, r)  ->  {"round": r, "run", "probe", "sends": "grads"|"losses", "from": s,
                           "catchup": rounds s..r-1 of the log (what the device lacks)}
    reply             <-  {"round": r, "have": r, "grads": [g_1..g_q] or "losses": [one per
                           replica], "hash", "loss", "tokens"} or {"error": "..."}
    close(r, replies) ->  the round's record: its coefficients from the included devices'
                          replies (aggregate.py), appended to the log (persisted before the
                          next round is sent)

A round's seeds are drawn from a finite pool (`--seed-pool` candidates, FedKSeed) by a
function of (seed, round) alone, so a restarted server draws the same ones and a device draws
them itself (they are never sent). A reply is counted only if it answers this round, is caught
up, holds the right count of finite numbers within `--grad-bound` and reports the same
weights' hash as the majority; any other is excluded with its reason, and the round completes
with the rest (with none left: its scalars are 0, a no-op every device applies alike). The
coefficients and learning rate are stored rounded to float32, the precision they cross the
wire in (wire.py): the log holds exactly what every device applies. The update itself
reaches each device with its next request (`catchup`), or with the closing sync that follows
the last round.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import numpy as np

from . import aggregate as agg
from .log import FedLog


def draw_seeds(seed: int, rnd: int, pool: int, queries: int) -> list[int]:
    """Round `rnd`'s seeds: `queries` distinct candidates of range(pool) (with repeats only if
    the pool is smaller), a function of (seed, rnd) alone."""
    digest = hashlib.sha256(f"pocketllm-fed:{seed}:{rnd}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    if queries <= pool:
        return rng.sample(range(pool), queries)
    return [rng.randrange(pool) for _ in range(queries)]


def f32(xs: list[float]) -> list[float]:
    """The values rounded to float32 (as Python floats: exact, and what the wire carries);
    beyond float32's range: inf (a round's coefficients then make it a no-op: `close`)."""
    with np.errstate(over="ignore"):
        return np.asarray(xs, dtype=np.float32).astype(np.float64).tolist()


def check_reply(reply, rnd: int, queries: int, bound: float, sends: str = "grads",
                replicas: int | None = None) -> str | None:
    """Why `reply` cannot be counted in round `rnd` (None: it can, its hash aside). `sends`:
    what it must carry, "grads" (`queries` of them) or "losses" (`replicas` of them, and the
    tokens they average over)."""
    if not isinstance(reply, dict):
        return f"not a reply ({type(reply).__name__})"
    if "malformed" in reply:
        return f"malformed reply: {str(reply['malformed'])[:200]}"
    if "error" in reply:
        return f"device error: {str(reply['error'])[:200]}"
    if reply.get("round") != rnd:
        return f"answers round {reply.get('round')!r}, not {rnd}"
    if reply.get("have") != rnd:
        return f"not caught up (applied {reply.get('have')!r} of {rnd} rounds)"
    want, what = (queries, "queries") if sends == "grads" else (replicas, "replicas")
    g = reply.get(sends)
    if not isinstance(g, (list, tuple)) or len(g) != want:
        n = len(g) if isinstance(g, (list, tuple)) else type(g).__name__
        return f"wrong length: {n} {sends} for {want} {what}"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in g):
        return f"{sends} that are not numbers"
    if not all(math.isfinite(x) for x in g):
        return f"non-finite {sends}"
    if any(abs(x) > bound for x in g):
        return f"{sends} out of range (|value| > --grad-bound {bound:g})"
    if sends == "losses" and not (isinstance(reply.get("tokens"), int)
                                  and 0 < reply["tokens"] < 2**32):
        return f"losses over {reply.get('tokens')!r} tokens"
    if not isinstance(reply.get("hash"), str) or len(reply["hash"]) != 64:
        return "no weights hash"
    return None


class Coordinator:
    """A federation's server state: its log (resumed if there is one) and what it knows of each
    node (the rounds it has applied, from its last reply)."""

    def __init__(self, log: FedLog, aggregate: str = "mean", trim: float = 0.1,
                 bound: float = 1e3, estimator=None):
        """`estimator`: (the run's estimator (zo/estimators), round -> its eps), which
        --aggregate pooled applies to the devices' pooled losses (`build.estimator`)."""
        if aggregate not in agg.REGISTRY:
            raise ValueError(f"unknown --aggregate {aggregate!r}; available: "
                             f"{', '.join(sorted(agg.REGISTRY))}")
        self.sends = agg.REGISTRY[aggregate].sends
        if self.sends == "losses" and estimator is None:
            raise ValueError(f"--aggregate {aggregate} needs the run's estimator")
        self.log, self.rule, self.trim, self.bound = log, aggregate, trim, bound
        self.estimator = estimator
        self.replicas = len(estimator[0].replicas()) if estimator else None
        h = log.header
        self.seed, self.pool, self.queries, self.run = h["seed"], h["pool"], h["queries"], h["run"]
        self.known: dict[int, int] = {}  # node -> rounds it has applied (its last word)

    @property
    def round(self) -> int:
        """The next round to run (rounds done so far)."""
        return len(self.log.records)

    def seeds(self, rnd: int) -> list[int]:
        return draw_seeds(self.seed, rnd, self.pool, self.queries)

    def request(self, node: int, rnd: int | None = None, probe: bool = True) -> dict:
        """What node `node` is sent for round `rnd` (default: the next): the round's seeds (none
        when `probe` is False: a sync that only brings it up to date) and the log's rounds it
        lacks, from the last count it gave (a node never heard from gets them all). The
        seeds are not in it: the device draws them (`draw_seeds`)."""
        rnd = self.round if rnd is None else rnd
        start = min(self.known.get(node, 0), rnd)
        return {"round": rnd, "run": self.run, "probe": probe, "sends": self.sends,
                "from": start, "catchup": [_compact(r) for r in self.log.records[start:rnd]]}

    def hear(self, node: int, reply) -> None:
        """Note the rounds a node says it has applied (even in a reply not counted)."""
        if isinstance(reply, dict) and isinstance(reply.get("have"), int) and reply["have"] >= 0:
            self.known[node] = min(reply["have"], self.round)
        elif isinstance(reply, dict) and reply.get("resync"):
            self.known[node] = 0  # out of step: it starts over from the base model

    def close(self, rnd: int, replies: dict[int, object], lr: float) -> dict:
        """Aggregate round `rnd` from `replies` (node -> its reply; a node that did not answer
        is absent), append the round's record to the log and return it."""
        if rnd != self.round:
            raise ValueError(f"round {rnd} closed while the log is at round {self.round}")
        excluded: dict[str, str] = {}
        ok: dict[int, dict] = {}
        for node, reply in sorted(replies.items()):
            self.hear(node, reply)
            why = check_reply(reply, rnd, self.queries, self.bound, self.sends, self.replicas)
            if why is None:
                ok[node] = reply
            else:
                excluded[str(node)] = why
        # the weights the majority holds (ties: the first seen); a device elsewhere is out of
        # step with the log and must start over from the base model (it is told so next time)
        consensus = Counter(r["hash"] for r in ok.values()).most_common(1)
        want = consensus[0][0] if consensus else None
        for node in [n for n, r in ok.items() if r["hash"] != want]:
            excluded[str(node)] = "weights differ from the other devices' (hash)"
            self.known[node] = 0
            del ok[node]
        grads = [0.0] * self.queries
        if ok:
            got = f32(agg.combine(self.rule, [ok[n] for n in sorted(ok)], self.trim,
                                  self._estimate(rnd)))
            if all(math.isfinite(g) for g in got):
                grads = got
            else:  # beyond float32's range: no step rather than a non-finite one
                excluded["*"] = f"coefficients {got} not finite in float32: round skipped"
        rec = {"round": rnd, "seeds": self.seeds(rnd), "grads": grads, "lr": f32([lr])[0],
               "hash": want, "clients": sorted(ok), "excluded": excluded}
        if ok:
            rec["loss"] = math.fsum(float(r.get("loss", 0.0)) for r in ok.values()) / len(ok)
        self.log.append(rec)
        return rec

    def _estimate(self, rnd: int):
        """The run's estimator at round `rnd`'s eps, as aggregate.Estimate (None: none)."""
        if self.estimator is None:
            return None
        est, eps_at = self.estimator
        import torch  # (only here: the protocol itself needs no torch)
        return lambda losses: est.projected(torch.tensor(losses, dtype=torch.float64),
                                            eps_at(rnd))

    def check_final(self, replies: dict[int, object]) -> dict:
        """The closing sync: every node that answered holds the same weights. Returns
        {"hash", "agree": [nodes], "differ": {node: why}}."""
        hashes, differ = {}, {}
        for node, r in sorted(replies.items()):
            self.hear(node, r)
            if not isinstance(r, dict) or "error" in r or r.get("have") != self.round:
                differ[str(node)] = (r.get("error") if isinstance(r, dict) and "error" in r
                                     else "not caught up")
            else:
                hashes[node] = r.get("hash")
        top = Counter(hashes.values()).most_common(1)
        want = top[0][0] if top else None
        differ.update({str(n): "weights differ (hash)" for n, h in hashes.items() if h != want})
        return {"hash": want, "agree": sorted(n for n, h in hashes.items() if h == want),
                "differ": differ}


def _compact(rec: dict) -> dict:
    """What a device needs of a round's record to apply it (and check it before)."""
    return {"round": rec["round"], "grads": rec["grads"], "lr": rec["lr"], "hash": rec["hash"]}
