"""The protocol's dicts (server.py) as Flower records, and back: one ConfigRecord of plain
numbers and strings per message, nothing else (no ArrayRecord crosses the wire).

    request  "fed": round, run, seeds, from, and the rounds it carries flattened:
                    c.seeds (q per round), c.grads (q per round), c.lr, c.hash
    reply    "fed": round, have, grads, hash, loss, tokens; or error (and have)
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

KEY = "fed"


def pack_request(req: dict) -> RecordDict:
    cat = req["catchup"]
    return RecordDict({KEY: ConfigRecord({
        "round": req["round"], "run": req["run"], "seeds": list(req["seeds"]),
        "from": req["from"],
        "c.seeds": [int(k) for r in cat for k in r["seeds"]],
        "c.grads": [float(g) for r in cat for g in r["grads"]],
        "c.lr": [float(r["lr"]) for r in cat],
        "c.hash": [r["hash"] or "" for r in cat]})})


def unpack_request(content: RecordDict, queries: int) -> dict:
    """The request a device got (`queries`: its own count; a server with another one is
    caught by the run digest)."""
    c = content[KEY]
    start, n = int(c["from"]), len(c["c.lr"])
    if len(c["c.seeds"]) != n * queries or len(c["c.grads"]) != n * queries:
        raise ValueError(f"request of round {c['round']}: {n} rounds of catch-up with "
                         f"{len(c['c.seeds'])} seeds, {len(c['c.grads'])} scalars (expected "
                         f"{n * queries} each)")
    cat = [{"round": start + i, "seeds": c["c.seeds"][i * queries:(i + 1) * queries],
            "grads": c["c.grads"][i * queries:(i + 1) * queries], "lr": c["c.lr"][i],
            "hash": c["c.hash"][i] or None} for i in range(n)]
    return {"round": int(c["round"]), "run": c["run"], "seeds": list(c["seeds"]),
            "from": start, "catchup": cat}


def pack_reply(reply: dict) -> RecordDict:
    rec = {k: v for k, v in reply.items() if v is not None}
    if "grads" in rec:
        rec["grads"] = [float(g) for g in rec["grads"]]
    for k in ("loss",):
        if k in rec:
            rec[k] = float(rec[k])
    return RecordDict({KEY: ConfigRecord(rec)})


def unpack_reply(content: RecordDict) -> dict:
    rec = content.get(KEY) if content is not None else None
    if rec is None:
        return {"error": "reply without a 'fed' record"}
    return {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}
