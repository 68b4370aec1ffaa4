"""Devices that train one model together: equal weights after every round, dropout and
rejoin, late joiners, malformed scalars, a server restart (in-process, no Flower)."""

from __future__ import annotations

import math

import pytest
import torch

from pocketllm.federated import build, server
from tests.federated.conftest import N, SETTINGS, fed_args


def coordinator(fed_data, out, **kw) -> server.Coordinator:
    args = fed_args(fed_data, out, **kw)
    _, cfg = build.resolve(args, dict(SETTINGS))
    return build.coordinator(args, cfg)


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
        # each device probed its own data: different losses, one shared update
        assert len({tuple(replies[n]["losses"]) for n in trainers}) == N
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


@pytest.mark.parametrize("rule", ["pooled", "mean"])
@pytest.mark.parametrize("bad,why", [
    (lambda n: [math.nan] * n, "non-finite"),
    (lambda n: [1.0, math.inf] + [0.0] * (n - 2), "non-finite"),
    (lambda n: [1e9] + [0.0] * (n - 1), "out of range"),
    (lambda n: [0.5] * (n - 1), "wrong length"), (lambda n: [0.5] * (n + 1), "wrong length")])
def test_malformed_scalars_are_excluded_without_touching_the_aggregate(fresh, fed_data,
                                                                      tmp_path, bad, why, rule):
    honest = {n: fresh[n] for n in range(2)}
    ref, _ = run_round(coordinator(fed_data, tmp_path / "ref", aggregate=rule), honest)
    for d in fresh.values():
        d.reset()

    def liar(req):
        reply = fresh[2].handle(req)
        key = req["sends"]
        return {**reply, key: bad(len(reply[key]))}
    rec, _ = run_round(coordinator(fed_data, tmp_path / "bad", aggregate=rule),
                       {**honest, 2: liar})
    assert rec["clients"] == [0, 1] and why in rec["excluded"]["2"]
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


def test_pooled_with_every_device_is_pooled_training_on_their_union(fresh, fed_data, tmp_path):
    """--aggregate pooled: each round's update is the one a single run takes on the union of
    the devices' batches (same seeds, same rows): the pooled losses are the union's to float32
    rounding, and the estimate from them differs from pooled training's only by that rounding
    divided by the losses' spread; the mean of the devices' own fzoo estimates is far off."""
    from pocketllm.federated.aggregate import pooled_losses
    c = coordinator(fed_data, tmp_path, aggregate="pooled")
    trainers = {n: fresh[n] for n in range(N)}
    ref = fresh[N]  # the pooled run: one model, the union's batch each round
    est, eps = ref.method.estimator, ref.method.cfg.eps
    assert type(est).__name__ == "FZOO"
    for r in range(3):
        bts = [trainers[n].batch_at.batcher for n in range(N)]
        union = bts[0].collate([b.encoded[i] for b in bts for i in b.indices(r)],
                               bts[0].pad_id)
        assert union["input_ids"].shape[0] == 2 * N
        keys = ref.keys(ref.seeds(r))
        want, _, _ = ref.method.probe([union], keys, eps)  # pooled training's estimate
        lu, _, _ = ref.method.probe_losses([union], keys, eps)  # ... from these losses
        assert want == est.projected(torch.tensor(lu, dtype=torch.float64), eps)
        rec, replies = run_round(c, trainers)
        assert rec["clients"] == list(range(N)), rec["excluded"]
        got = pooled_losses([replies[n]["losses"] for n in trainers],
                            [replies[n]["tokens"] for n in trainers])
        assert got == pytest.approx(lu, rel=1e-6)
        # fzoo: g = (l_j - l_0) / std(l): an error d in the losses moves g by ~2 d / std
        d, sd = max(abs(a - b) for a, b in zip(got, lu)), torch.tensor(lu[1:]).std().item()
        assert rec["grads"] == pytest.approx(want, abs=4 * d / sd + 1e-6)
        own = [est.projected(torch.tensor(replies[n]["losses"], dtype=torch.float64), eps)
               for n in trainers]
        mean = [sum(g) / N for g in zip(*own)]
        assert max(abs(a - b) for a, b in zip(mean, want)) > 20 * (4 * d / sd)
        ref.apply(rec)  # the pooled run's step: its estimate applied as a training step's
    assert sync(c, trainers)["agree"] == list(range(N))
    for a, b in zip(fresh[0].tensors, ref.tensors):
        assert torch.equal(a, b)  # (ref applied the log's coefficients: the same weights)
