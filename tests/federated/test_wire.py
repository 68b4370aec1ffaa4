"""The packed messages: what a request and a reply carry survives the trip, their size, and a
message that does not parse is an error naming what is wrong (never an exception)."""

from __future__ import annotations

import math
import struct

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from pocketllm.federated import server, wire  # noqa: E402

H = "ab" * 32


def request(n_rounds=1, q=16, probe=True, sends="losses"):
    cat = [{"round": 5 + i, "grads": server.f32([0.1 * (j - 8) for j in range(q)]),
            "lr": server.f32([1e-2])[0], "hash": None if i else H} for i in range(n_rounds)]
    return {"round": 5 + n_rounds, "run": "0123456789abcdef", "probe": probe, "sends": sends,
            "from": 5, "catchup": cat}


@pytest.mark.parametrize("sends,probe", [("losses", True), ("grads", True), ("grads", False)])
def test_a_request_survives_the_trip(sends, probe):
    req = request(2, sends=sends, probe=probe)
    assert wire.unpack_request(wire.pack_request(req), 16) == req


def test_a_reply_survives_the_trip_in_float32():
    for key, n in (("losses", 17), ("grads", 16)):
        reply = {"round": 6, "have": 6, "hash": H, key: server.f32([0.5 + j for j in range(n)]),
                 "loss": 0.75, "tokens": 2}
        assert wire.unpack_reply(wire.pack_reply(reply)) == reply
    sync = {"round": 6, "have": 6, "hash": H}
    assert wire.unpack_reply(wire.pack_reply(sync)) == {**sync, "loss": 0.0, "tokens": 0}
    err = wire.unpack_reply(wire.pack_reply({"error": "x" * 500, "have": 3}))
    assert err == {"error": "x" * wire.MAX_ERROR, "have": 3}
    # beyond float32: inf, which the server refuses with its reason (no exception here)
    big = wire.unpack_reply(wire.pack_reply({**sync, "grads": [1e39] * 16}))
    assert math.isinf(big["grads"][0])
    assert "non-finite" in server.check_reply(big, 6, 16, 1e3)


def test_a_steady_rounds_payloads_are_small():
    # the round's seeds are not sent: a round caught up is 4 + 32 + 4q bytes after the header
    assert len(wire.pack_request(request(1))["fed"]["b"]) == 20 + 4 + 32 + 64
    reply = {"round": 6, "have": 6, "hash": H, "losses": [1.0] * 17, "loss": 1.0, "tokens": 2}
    assert len(wire.pack_reply(reply)["fed"]["b"]) == 10 + 32 + 4 + 6 + 68


def _rec(b):
    return RecordDict({"fed": ConfigRecord({"b": b})})


@pytest.mark.parametrize("content,why", [
    (RecordDict({}), "no 'fed' record"),
    (_rec(b"\x01\x01"), "shorter than a request's header"),
    (_rec(b"\x02" + bytes(21)), "protocol version 2"),
    (_rec(struct.pack("<BBII8sH", 1, 7, 0, 0, bytes(8), 0)), "unknown request kind 7"),
    (_rec(struct.pack("<BBII8sH", 1, 1, 3, 2, bytes(8), 1) + bytes(40)),
     "for 1 rounds of catch-up of 16 queries (expected 120)"),
])
def test_a_malformed_request_is_a_clear_error(content, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        wire.unpack_request(content, 16)


@pytest.mark.parametrize("content,why", [
    (None, "no 'fed' record"),
    (RecordDict({"fed": ConfigRecord({"b": "text"})}), "bytes field"),
    (_rec(b"\x01"), "shorter than a reply's header"),
    (_rec(b"\x09" + bytes(9)), "protocol version 9"),
    (_rec(struct.pack("<BBII", 1, 5, 0, 0)), "unknown reply kind 5"),
    (_rec(struct.pack("<BBII", 1, 2, 0, 0) + bytes(10)), "20 bytes, shorter than a reply with its hash"),
    (_rec(struct.pack("<BBII32sfIH", 1, 2, 0, 0, bytes(32), 0.0, 2, 17) + bytes(64)),
     "116 bytes for 17 values (expected 120)"),
])
def test_a_malformed_reply_is_counted_out_with_its_reason(content, why):
    got = wire.unpack_reply(content)
    assert set(got) == {"malformed"} and why in got["malformed"], got
    assert server.check_reply(got, 0, 16, 1e3, "losses", 17).startswith("malformed reply")
