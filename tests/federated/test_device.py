"""Devices that train one model together: equal weights after every round, dropout and
rejoin, late joiners, malformed scalars, a server restart (in-process, no Flower)."""

from __future__ import annotations

import math

import pytest
import torch

from pocketllm.federated import build, server
from pocketllm.federated.log import FedLog
from tests.federated.conftest import N, SETTINGS, fed_args


def coordinator(fed_data, out, **kw) -> server.Coordinator:
    args = fed_args(fed_data, out)
    _, cfg = build.resolve(args, dict(SETTINGS))
    return server.Coordinator(FedLog(out, build.header(args, cfg)), **kw)


def run_round(c, devices, lr=1e-2):
    """One round with `devices` (node -> Device or a function of the request)."""
    rnd = c.round
    replies = {n: (d.handle if hasattr(d, "handle") else d)(c.request(n))
               for n, d in devices.items()}
    return c.close(rnd, replies, lr), replies


def sync(c, devices) -> dict:
    return c.check_final({n: d.handle(c.request(n, probe=False)) for n, d in devices.items()})


def test_every_device_holds_the_same_weights_after_every_round(fresh, fed_data, tmp_path):
    c = coordinator(fed_data, tmp_path)
    trainers = {n: fresh[n] for n in range(N)}
    base = fresh[0].hash()
    for r in range(3):
        rec, replies = run_round(c, trainers)
        assert rec["clients"] == list(range(N)), rec["excluded"]
        # each device probed its own data: different scalars, one shared update
        assert len({tuple(replies[n]["grads"]) for n in trainers}) == N
        assert len({fresh[n].hash() for n in trainers}) == 1  # (applied at the next request)
    final = sync(c, fresh)  # the one without data follows the log alone
    assert final["agree"] == list(range(N + 1)) and not final["differ"]
    assert final["hash"] != base
    for a, b in zip(fresh[0].tensors, fresh[N].tensors):
        assert torch.equal(a, b)


def test_a_dropped_device_rejoins_from_its_checkpoint_and_a_late_one_from_the_base(
        fresh, fed_data, tmp_path):
    c = coordinator(fed_data, tmp_path / "log")
    trainers = {n: fresh[n] for n in range(N)}
    run_round(c, trainers)
    run_round(c, trainers)                                # (holds round 0's update)
    fresh[2].save(tmp_path / "dev2.safetensors")          # device 2 stops here ...
    fresh[2].reset()                                      # ... and loses its memory
    for _ in range(2):
        rec, _ = run_round(c, {0: fresh[0], 1: fresh[1]})  # the round completes without it
        assert rec["clients"] == [0, 1]
    fresh[2].restore(tmp_path / "dev2.safetensors")       # rejoins from its checkpoint
    assert fresh[2].have == 1 and c.request(2)["from"] == 1  # only the rounds it lacks
    rec, replies = run_round(c, trainers)
    assert rec["clients"] == [0, 1, 2], rec["excluded"]
    assert len({replies[n]["hash"] for n in trainers}) == 1
    # device N joins only now: it replays rounds 0..3 from the base model
    assert c.request(N)["from"] == 0
    assert sync(c, fresh)["agree"] == list(range(N + 1))


def test_a_device_out_of_step_is_excluded_then_starts_over(fresh, fed_data, tmp_path):
    c = coordinator(fed_data, tmp_path)
    trainers = {n: fresh[n] for n in range(N)}
    run_round(c, trainers)
    run_round(c, trainers)
    with torch.no_grad():
        fresh[1].tensors[0].view(-1)[0] += 1.0            # a flipped weight
    rec, _ = run_round(c, trainers)
    assert rec["clients"] == [0, 2] and "out of step" in rec["excluded"]["1"]
    rec, _ = run_round(c, trainers)                       # sent the whole log: starts over
    assert rec["clients"] == [0, 1, 2], rec["excluded"]
    assert sync(c, trainers)["agree"] == [0, 1, 2]


@pytest.mark.parametrize("bad", [[math.nan] * 4, [1.0, math.inf, 0.0, 0.0], [1e9, 0, 0, 0],
                                 [0.5] * 3, [0.5] * 5])
def test_malformed_scalars_are_excluded_without_touching_the_aggregate(fresh, fed_data,
                                                                      tmp_path, bad):
    honest = {n: fresh[n] for n in range(2)}
    ref, _ = run_round(coordinator(fed_data, tmp_path / "ref"), honest)
    for d in fresh.values():
        d.reset()

    def liar(req):
        reply = fresh[2].handle(req)
        return {**reply, "grads": bad}
    rec, _ = run_round(coordinator(fed_data, tmp_path / "bad"), {**honest, 2: liar})
    assert rec["clients"] == [0, 1] and "2" in rec["excluded"]
    assert rec["grads"] == ref["grads"]  # the honest devices' aggregate, bit for bit


def test_a_server_restarted_mid_run_ends_where_an_uninterrupted_one_does(fresh, fed_data,
                                                                          tmp_path):
    trainers = {n: fresh[n] for n in range(N)}
    c = coordinator(fed_data, tmp_path / "straight")
    for _ in range(4):
        run_round(c, trainers)
    want = sync(c, trainers)["hash"]
    for d in fresh.values():
        d.reset()
    c = coordinator(fed_data, tmp_path / "restarted")
    for _ in range(2):
        run_round(c, trainers)
    del c  # killed; a new server process reads the log
    c = coordinator(fed_data, tmp_path / "restarted")
    assert c.round == 2 and c.known == {}
    for _ in range(2):
        rec, _ = run_round(c, trainers)
        assert rec["clients"] == list(range(N))
    assert sync(c, trainers)["hash"] == want


def test_a_device_with_other_settings_is_refused(fresh, fed_data, tmp_path):
    c = coordinator(fed_data, tmp_path, aggregate="median")
    other = build.load(fed_args(fed_data, lora_rank=2), dict(SETTINGS)).device
    reply = other.handle(c.request(7))
    assert "settings differ" in reply["error"]
    rec, _ = run_round(c, {0: fresh[0], 7: other})
    assert rec["clients"] == [0] and "settings differ" in rec["excluded"]["7"]
