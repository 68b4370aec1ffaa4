"""The server's round protocol without a model: seeds, reply checks, aggregation, the log."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pocketllm.federated import aggregate, server
from pocketllm.federated.log import NAME, FedLog

HEAD = {"seed": 7, "pool": 64, "queries": 3, "run": "0123456789abcdef"}
H = "a" * 64


def good(rnd, grads, h=H):
    return {"round": rnd, "have": rnd, "grads": grads, "hash": h, "loss": 1.0}


def test_seeds_are_a_function_of_seed_and_round_within_the_pool():
    a = server.draw_seeds(7, 5, 64, 16)
    assert a == server.draw_seeds(7, 5, 64, 16)
    assert len(set(a)) == 16 and all(0 <= k < 64 for k in a)
    assert a != server.draw_seeds(7, 6, 64, 16) and a != server.draw_seeds(8, 5, 64, 16)
    assert len(server.draw_seeds(7, 0, 2, 5)) == 5  # a pool smaller than a round: repeats


@pytest.mark.parametrize("reply,why", [
    ({"error": "disk full"}, "device error: disk full"),
    (good(1, [0.1, 0.2, 0.3]), "answers round 1"),
    ({**good(0, [0.1, 0.2, 0.3]), "have": 2}, "not caught up"),
    (good(0, [0.1, 0.2]), "wrong length: 2 grads for 3 queries"),
    (good(0, [0.1, 0.2, 0.3, 0.4]), "wrong length: 4"),
    (good(0, "0.1,0.2,0.3"), "wrong length"),
    (good(0, [0.1, "x", 0.3]), "not numbers"),
    (good(0, [0.1, True, 0.3]), "not numbers"),
    (good(0, [0.1, math.nan, 0.3]), "non-finite"),
    (good(0, [0.1, -math.inf, 0.3]), "non-finite"),
    (good(0, [0.1, 1e9, 0.3]), "out of range"),
    (good(0, [0.1, 0.2, 0.3], h="short"), "no weights hash"),
    ("garbage", "not a reply"),
    ({"malformed": "7 bytes"}, "malformed reply: 7 bytes"),
])
def test_a_malformed_reply_is_refused_with_its_reason(reply, why):
    got = server.check_reply(reply, 0, 3, 1e3)
    assert got is not None and why in got
    assert server.check_reply(good(0, [0.1, -0.2, 3]), 0, 3, 1e3) is None


def test_aggregates_per_query_and_tolerate_outliers():
    cols = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -500.0]]
    assert aggregate.aggregate("mean", cols) == [26.5, -110.0]
    assert aggregate.aggregate("median", cols) == [2.5, 15.0]
    assert aggregate.aggregate("trimmed", cols, 0.25) == [2.5, 15.0]  # one dropped each end
    assert aggregate.aggregate("trimmed", [[1.0], [5.0]], 0.4) == [3.0]  # never all dropped
    with pytest.raises(ValueError, match="available: mean, median, trimmed"):
        aggregate.aggregate("max", cols)


def test_bad_replies_are_excluded_and_the_round_completes_with_the_rest(tmp_path):
    c = server.Coordinator(FedLog(tmp_path, HEAD))
    replies = {0: good(0, [1.0, 2.0, 3.0]), 1: good(0, [3.0, 4.0, 5.0]),
               2: good(0, [math.nan, 0.0, 0.0]), 3: good(0, [1.0, 2.0]),
               4: good(0, [1e6, 0.0, 0.0]), 5: {"error": "boom"},
               6: good(0, [9.0, 9.0, 9.0], h="b" * 64)}  # another model: the minority hash
    rec = c.close(0, replies, lr=0.5)
    assert rec["clients"] == [0, 1] and rec["grads"] == [2.0, 3.0, 4.0]
    assert set(rec["excluded"]) == {"2", "3", "4", "5", "6"}
    assert "hash" in rec["excluded"]["6"] and rec["hash"] == H
    assert c.known[6] == 0  # it is sent the whole log next time, to start over
    # nobody left: a no-op round every device applies alike
    rec = c.close(1, {0: {"error": "x"}}, lr=0.5)
    assert rec["grads"] == [0.0, 0.0, 0.0] and rec["clients"] == [] and rec["hash"] is None


def test_requests_carry_the_rounds_a_node_lacks(tmp_path):
    c = server.Coordinator(FedLog(tmp_path, HEAD))
    for r in range(3):
        c.close(r, {0: good(r, [1.0, 1.0, 1.0])}, lr=0.1)
    req = c.request(0)
    assert req["round"] == 3 and req["from"] == 2 and [x["round"] for x in req["catchup"]] == [2]
    assert req["probe"] and "seeds" not in req  # the device draws them: these
    assert c.log.records[2]["seeds"] == server.draw_seeds(7, 2, 64, 3)
    late = c.request(9)  # never heard from: the whole log
    assert late["from"] == 0 and len(late["catchup"]) == 3
    assert not c.request(0, probe=False)["probe"]
    assert json.loads(json.dumps(req)) == req  # plain numbers and strings, nothing else


def test_a_restarted_server_resumes_from_its_log(tmp_path):
    c = server.Coordinator(FedLog(tmp_path, HEAD))
    for r in range(2):
        c.close(r, {0: good(r, [1.0, 2.0, 3.0])}, lr=0.1)
    lines = (tmp_path / NAME).read_text().splitlines()
    assert len(lines) == 3 and not (tmp_path / (NAME + ".tmp")).exists()
    again = server.Coordinator(FedLog(tmp_path, HEAD))
    assert again.round == 2 and again.log.records == c.log.records
    assert again.seeds(2) == c.seeds(2)
    with pytest.raises(SystemExit, match="another federation .*pool"):
        FedLog(tmp_path, {**HEAD, "pool": 65})
    (tmp_path / NAME).write_text(lines[0] + "\n" + lines[2] + "\n")  # round 0 missing
    with pytest.raises(SystemExit, match=r":2: round record 0 malformed"):
        FedLog(tmp_path, HEAD)


def test_the_log_holds_float32_coefficients_and_lr(tmp_path):
    c = server.Coordinator(FedLog(tmp_path, HEAD))
    rec = c.close(0, {0: good(0, [0.1, 0.2, 0.3]), 1: good(0, [0.2, 0.2, 0.2])}, lr=0.01)
    # what crosses the wire (float32) is what the log says every device applies
    assert rec["grads"] == server.f32([0.15, 0.2, 0.25]) and rec["lr"] == server.f32([0.01])[0]
    assert all(float(np.float32(g)) == g for g in rec["grads"] + [rec["lr"]])


def losses_reply(rnd, losses, tokens, h=H):
    return {"round": rnd, "have": rnd, "losses": losses, "tokens": tokens, "hash": h,
            "loss": losses[0]}


def test_pooled_applies_the_estimator_to_the_token_weighted_losses(tmp_path):
    import torch

    from pocketllm.zo import estimators
    fzoo = estimators.REGISTRY["fzoo"](3)
    c = server.Coordinator(FedLog(tmp_path, HEAD), "pooled", estimator=(fzoo, lambda r: 1e-3))
    assert c.request(0)["sends"] == "losses" and c.replicas == 4
    a, b = [1.0, 1.2, 0.9, 1.1], [2.0, 2.5, 1.5, 2.0]
    rec = c.close(0, {0: losses_reply(0, a, 1), 1: losses_reply(0, b, 3),
                      2: losses_reply(0, a[:3], 1), 3: losses_reply(0, a, 0)}, lr=0.1)
    assert rec["clients"] == [0, 1]
    assert "wrong length: 3 losses for 4 replicas" in rec["excluded"]["2"]
    assert "over 0 tokens" in rec["excluded"]["3"]
    pooled = [(x + 3 * y) / 4 for x, y in zip(a, b)]  # the loss of the 4 rows together
    assert rec["grads"] == server.f32(fzoo.projected(torch.tensor(pooled, dtype=torch.float64),
                                                     1e-3))
    # not the mean of the devices' own estimates: fzoo divides by each one's own spread
    own = [fzoo.projected(torch.tensor(x, dtype=torch.float64), 1e-3) for x in (a, b)]
    assert max(abs(g - (x + y) / 2) for g, x, y in zip(rec["grads"], *own)) > 0.1
    with pytest.raises(ValueError, match="needs the run's estimator"):
        server.Coordinator(FedLog(tmp_path / "x", HEAD), "pooled")


def test_coefficients_beyond_float32_make_the_round_a_no_op(tmp_path):
    class Huge:  # an estimator whose step overflows float32
        def replicas(self):
            return [None] * 4

        def projected(self, losses, eps):
            return [1e39, 0.0, 0.0]
    c = server.Coordinator(FedLog(tmp_path, HEAD), "pooled", estimator=(Huge(), lambda r: 1e-3))
    rec = c.close(0, {0: losses_reply(0, [1.0] * 4, 2)}, lr=0.1)
    assert rec["grads"] == [0.0, 0.0, 0.0] and "not finite in float32" in rec["excluded"]["*"]
