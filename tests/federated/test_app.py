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
REQUEST = {"round", "run", "seeds", "from", "c.seeds", "c.grads", "c.lr", "c.hash"}
REPLY = {"round", "have", "grads", "hash", "loss", "tokens", "error"}


@pytest.fixture(scope="module")
def simulated(fed_data, tmp_path_factory):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from pocketllm.federated.simulate import simulate
    out = tmp_path_factory.mktemp("sim")
    seen = []  # (direction, message type, content fields, every byte Flower serialises)

    def tap(direction, msg):
        objs = get_all_nested_objects(msg).values()
        seen.append((direction, msg.metadata.message_type,
                     {k: dict(v) for k, v in msg.content.items()},
                     [o.deflate() for o in objs],
                     sum(len(msg.content[k].deflate()) for k in msg.content)))
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
    from pocketllm.models import load_model
    _, _, seen = simulated
    assert {(d, t) for d, t, *_ in seen} == {("out", "train"), ("in", "train"),
                                            ("out", "query"), ("in", "query")}
    _, tok = load_model("tiny-llama")
    texts = [s for t, c in RECORDS for s in (t, c.strip())]
    ids = [tok(f"Note: {t}\nCategory:{c}")["input_ids"] for t, c in RECORDS]
    runs = {tuple(x[i:i + 3]) for x in ids for i in range(len(x) - 2)}  # any 3 token ids
    for direction, kind, content, blobs, _ in seen:
        assert set(content) == {"fed"}, content.keys()  # one ConfigRecord, no ArrayRecord
        fields = set(content["fed"])
        assert fields <= (REQUEST if direction == "out" else REPLY), fields
        for blob in blobs:
            for text in texts:
                assert text.encode() not in blob, (kind, text)
        for v in content["fed"].values():
            if isinstance(v, list) and v and isinstance(v[0], int):
                assert not {tuple(v[i:i + 3]) for i in range(len(v) - 2)} & runs


def test_a_rounds_records_cost_under_a_kilobyte_per_device(simulated):
    _, _, seen = simulated
    # a device sampled every round: its request holds the round's seeds and the last round's
    # update, its reply the scalars and the hash (the records' bytes as Flower serialises
    # them; Flower's own message metadata comes on top, benchmarks/results/federated.md)
    def largest(direction):
        return max(n for d, t, c, _, n in seen
                   if d == direction and t == "train" and c["fed"].get("round", 0) >= 1)
    assert largest("out") + largest("in") < 1024, (largest("out"), largest("in"))
