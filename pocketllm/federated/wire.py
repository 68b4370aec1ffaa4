"""The protocol's dicts (server.py) as Flower records, and back: one ConfigRecord holding one
packed bytes value per message, nothing else (no ArrayRecord, no named fields: a field's name
costs its bytes in every message). Little-endian, byte by byte:

    request  B version | B what (0 sync, 1 probe: reply projected gradients, 2 probe: reply
             losses) | I round | I from | 8s run digest | H n catch-up rounds, then per round
             from.. : f lr | 32s hash (zeros: none) | q x f coefficients
    reply    B version | B what (0 up to date, 1 gradients, 2 losses, 3 error) | I round |
             I have | then: 32s hash | f loss | I tokens | H n | n x f values
             (error: the message, UTF-8, at most 200 bytes)

The round's seeds are never sent: a device draws them from (its run seed, the round, the pool)
as the server does (`server.draw_seeds`). The coefficients and learning rates the server
sends are float32 because the log stores exactly those float32 values (server.py): what a
device applies and what `pocketllm replay` applies are the same numbers. A message that does
not parse is answered (request) or counted (reply) as an error naming what is wrong; it never
raises out of here.
"""

from __future__ import annotations

import struct

import numpy as np
from flwr.app import ConfigRecord, RecordDict

KEY, FIELD = "fed", "b"
VERSION = 1
# a request's `what` byte: 0 a sync (nothing to probe), else the probe's reply kind
SENDS = ("", "grads", "losses")  # (aggregate.Rule.sends)
ERROR = 3
REQ = struct.Struct("<BBII8sH")
REQ_ROUND = struct.Struct("<f32s")  # lr, hash; then q float32 coefficients
REPLY = struct.Struct("<BBII")
REPLY_BODY = struct.Struct("<32sfIH")  # hash, loss, tokens, n; then n float32 values
MAX_ERROR = 200


def _record(payload: bytes) -> RecordDict:
    return RecordDict({KEY: ConfigRecord({FIELD: payload})})


def _payload(content: RecordDict | None) -> bytes:
    rec = content.get(KEY) if content is not None else None
    if rec is None or not isinstance(rec.get(FIELD), bytes):
        raise ValueError(f"no '{KEY}' record with a bytes field '{FIELD}'")
    return rec[FIELD]


def _hash(h: str | None) -> bytes:
    return bytes.fromhex(h) if h else bytes(32)


def _unhash(b: bytes) -> str | None:
    return None if b == bytes(32) else b.hex()


def _floats(xs) -> bytes:
    # numpy, not struct: a value beyond float32's range becomes inf (refused by the server
    # with that reason) instead of raising on the device
    with np.errstate(over="ignore"):
        return np.asarray(xs, dtype="<f4").tobytes()


def pack_request(req: dict) -> RecordDict:
    cat = req["catchup"]
    body = [REQ.pack(VERSION, SENDS.index(req["sends"] if req["probe"] else ""), req["round"],
                     req["from"], bytes.fromhex(req["run"]), len(cat))]
    for r in cat:
        body += [REQ_ROUND.pack(r["lr"], _hash(r["hash"])), _floats(r["grads"])]
    return _record(b"".join(body))


def unpack_request(content: RecordDict, queries: int) -> dict:
    """The request a device got (`queries`: its own count; a server with another one is
    caught by the run digest). A ValueError says what is malformed."""
    b = _payload(content)
    if len(b) < REQ.size:
        raise ValueError(f"{len(b)} bytes, shorter than a request's header ({REQ.size})")
    version, what, rnd, start, run, n = REQ.unpack_from(b)
    if version != VERSION:
        raise ValueError(f"protocol version {version}, this device speaks {VERSION}")
    if what >= len(SENDS):
        raise ValueError(f"unknown request kind {what}")
    per = REQ_ROUND.size + 4 * queries
    if len(b) != REQ.size + n * per:
        raise ValueError(f"round {rnd}: {len(b)} bytes for {n} rounds of catch-up of {queries} "
                         f"queries (expected {REQ.size + n * per})")
    cat, off = [], REQ.size
    for i in range(n):
        lr, h = REQ_ROUND.unpack_from(b, off)
        grads = list(struct.unpack_from(f"<{queries}f", b, off + REQ_ROUND.size))
        cat.append({"round": start + i, "grads": grads, "lr": lr, "hash": _unhash(h)})
        off += per
    return {"round": rnd, "run": run.hex(), "probe": what > 0, "sends": SENDS[what] or "grads",
            "from": start, "catchup": cat}


def pack_reply(reply: dict) -> RecordDict:
    have = int(reply.get("have") or 0)
    if "error" in reply:
        msg = str(reply["error"]).encode()[:MAX_ERROR]
        return _record(REPLY.pack(VERSION, ERROR, int(reply.get("round") or 0), have) + msg)
    sends = next((k for k in SENDS[1:] if k in reply), "")
    vals = reply.get(sends, [])
    # (REPLY_BODY's layout; the loss through _floats, which cannot overflow)
    return _record(REPLY.pack(VERSION, SENDS.index(sends), reply["round"], have)
                   + _hash(reply["hash"]) + _floats([reply.get("loss", 0.0)])
                   + struct.pack("<IH", int(reply.get("tokens", 0)), len(vals)) + _floats(vals))


def unpack_reply(content: RecordDict | None) -> dict:
    """A device's reply as a dict; one that does not parse: {"malformed": why} (the server
    leaves it out of the round with that reason)."""
    try:
        b = _payload(content)
        if len(b) < REPLY.size:
            raise ValueError(f"{len(b)} bytes, shorter than a reply's header ({REPLY.size})")
        version, what, rnd, have = REPLY.unpack_from(b)
        if version != VERSION:
            raise ValueError(f"protocol version {version}, this server speaks {VERSION}")
        if what == ERROR:
            return {"error": b[REPLY.size:].decode("utf-8", "replace"), "have": have}
        if what >= len(SENDS):
            raise ValueError(f"unknown reply kind {what}")
        if len(b) < REPLY.size + REPLY_BODY.size:
            raise ValueError(f"{len(b)} bytes, shorter than a reply with its hash, loss, "
                             f"tokens and count ({REPLY.size + REPLY_BODY.size})")
        h, loss, tokens, n = REPLY_BODY.unpack_from(b, REPLY.size)
        if len(b) != REPLY.size + REPLY_BODY.size + 4 * n:
            raise ValueError(f"{len(b)} bytes for {n} values (expected "
                             f"{REPLY.size + REPLY_BODY.size + 4 * n})")
        out = {"round": rnd, "have": have, "hash": h.hex(), "loss": loss, "tokens": tokens}
        if what:
            out[SENDS[what]] = list(struct.unpack_from(f"<{n}f", b, REPLY.size
                                                       + REPLY_BODY.size))
        return out
    except (ValueError, struct.error) as e:
        return {"malformed": str(e)}
