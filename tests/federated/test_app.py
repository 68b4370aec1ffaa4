"""The Flower app on the Simulation Engine: devices agree after the run, the log rebuilds
their weights, and every message that crossed the wire holds only seeds, scalars, hashes and
round metadata (no record text, no token ids)."""

from __future__ import annotations

import json

import pytest

from tests.federated.conftest import RECORDS, SETTINGS, fed_args

pytest.importorskip("flwr")
pytest.importorskip("ray")

# every field a message may carry (wire.py), and nothing else
REQUEST = {"round", "run", "probe", "sends", "from", "catchup"}
CATCHUP = {"round", "grads", "lr", "hash"}
REPLY = {"round", "have", "grads", "losses", "hash", "loss", "tokens", "error"}


@pytest.fixture(scope="module")
def simulated(fed_data, tmp_path_factory):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from pocketllm.federated import wire
    from pocketllm.federated.simulate import simulate
    out = tmp_path_factory.mktemp("sim")
    seen = []  # (direction, message type, its records, what they decode to, every byte
    #            Flower serialises of the message)

    def tap(direction, msg):
        objs = get_all_nested_objects(msg).values()
        decoded = (wire.unpack_request(msg.content, SETTINGS["queries"]) if direction == "out"
                   else wire.unpack_reply(msg.content))
        seen.append((direction, msg.metadata.message_type,
                     {k: dict(v) for k, v in msg.content.items()}, decoded,
                     [o.deflate() for o in objs]))
    args = fed_args(fed_data, out, iters=3, partition="dirichlet:1.0")
    summary = simulate(args, dict(SETTINGS), tap=tap)
    return out, summary, seen


def test_the_devices_agree_and_the_log_rebuilds_their_weights(simulated):
    out, summary, _ = simulated
    assert summary["rounds"] == 3 and summary["agree"] == 3 and not summary["differ"]
    assert summary["rebuilt_hash_matches"]
    lines = (out / "fed_log.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    assert [len(r["clients"]) for r in recs] == [3, 3, 3] and not any(r["excluded"] for r in recs)
    assert (out / "adapter_model.safetensors").is_file()


def test_only_seeds_scalars_hashes_and_round_metadata_cross_the_wire(simulated, fed_data):
    import struct

    from pocketllm.models import load_model
    _, _, seen = simulated
    assert {(d, t) for d, t, *_ in seen} == {("out", "train"), ("in", "train"),
                                            ("out", "query"), ("in", "query")}
    _, tok = load_model("tiny-llama")
    texts = [s for t, c in RECORDS for s in (t, c.strip())]
    ids = [tok(f"Note: {t}\nCategory:{c}")["input_ids"] for t, c in RECORDS]
    runs = {tuple(x[i:i + 3]) for x in ids for i in range(len(x) - 2)}  # any 3 token ids
    # ... as any fixed-width integers would carry them
    packed = {struct.pack(f"<3{c}", *r) for r in runs for c in "HIQ"}
    for direction, kind, content, decoded, blobs in seen:
        assert set(content) == {"fed"}, content.keys()  # one ConfigRecord, no ArrayRecord
        assert set(content["fed"]) == {"b"}  # one packed field
        assert "malformed" not in decoded and "error" not in decoded, decoded
        assert set(decoded) <= (REQUEST if direction == "out" else REPLY), decoded.keys()
        for r in decoded.get("catchup", []):
            assert set(r) == CATCHUP
        for blob in blobs:
            for text in texts:
                assert text.encode() not in blob, (kind, text)
            assert not any(p in blob for p in packed), kind


def test_a_round_costs_under_a_kilobyte_per_device_with_flowers_envelope(simulated):
    _, _, seen = simulated
    # a device sampled every round: its request holds the last round's update, its reply its
    # losses and the hash; every byte Flower serialises of both messages (its metadata too)
    def largest(direction):
        return max(sum(map(len, blobs)) for d, t, _, m, blobs in seen
                   if d == direction and t == "train" and m["round"] >= 1)
    assert largest("out") + largest("in") < 1024, (largest("out"), largest("in"))
