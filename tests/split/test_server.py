"""Split mode against real `pocketllm serve` processes on loopback."""

from __future__ import annotations

import secrets
import threading

import grpc
import pytest
import torch

from pocketllm.split import split_pb2 as pb
from pocketllm.split import split_pb2_grpc as pb_grpc
from pocketllm.split.client import SplitClient, device_step, qtensor
from pocketllm.split.wire import config_to_spec

from .harness import STEPS, Proxy, Server, run_session, same_weights, side_config


def test_health_needs_no_token(server):
    stub = pb_grpc.SideTuningStub(grpc.insecure_channel(server.address))
    assert stub.Health(pb.HealthRequest(), timeout=120).status == "SERVING"


def test_end_to_end_training_lowers_the_loss(reference):
    acks, side = reference
    assert acks[-1][1] < acks[0][1]
    assert side.up.weight.abs().sum() > 0  # trained away from the zero init


def test_cli_end_to_end(server, token_file, tmp_path):
    from pocketllm.cli import main
    from pocketllm.split.side import load_side
    out = tmp_path / "run"
    rc = main(["train", "--method", "side", "--model", "tiny-llama", "--server", server.address,
               "--token-file", str(token_file), "--iters", "3", "--batch-size", "2",
               "--adapter-path", str(out), "--val-batches", "1", "--eval-batch-size", "4",
               "--side-width", "8", "--act-bits", "4", "--tap-every", "2"])
    assert rc == 0
    side = load_side(out / "side_network.safetensors")
    assert side.cfg.taps == [1] and side.cfg.act_bits == 4 and side.cfg.private_labels
    assert main(["eval", "--model", "tiny-llama", "--split", "valid", "--max-batches", "1",
                 "--side-network", str(out / "side_network.safetensors")]) == 0


def test_wrong_token_rejected(server, device):
    cfg = side_config(device[0])
    bad = SplitClient(server.address, "x" * 32)
    with pytest.raises(grpc.RpcError) as e:
        bad.open(secrets.token_hex(16), cfg)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "invalid token"  # nothing about sessions
    with pytest.raises(grpc.RpcError) as e:
        bad.fetch(secrets.token_hex(16))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(bad.stub.Train(iter([pb.Upload(session_id=secrets.token_hex(16))]), metadata=bad.md))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad.close()


def _send(client, sid, *uploads):
    return list(client.stub.Train(iter(uploads), metadata=client.md, timeout=180))


def test_malformed_payloads_get_an_error_and_the_server_keeps_serving(server, token_file, device):
    from pocketllm.split.wire import read_token
    model, _, _, batcher = device
    cfg = side_config(model)
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    assert client.open(sid, cfg) == 0
    good = device_step(model, batcher(0), cfg, 1).msg

    def variant(fn):
        b = pb.Batch()
        b.CopyFrom(good)
        fn(b)
        return pb.Upload(session_id=sid, batch=b)

    bad = {
        "truncated": variant(lambda b: setattr(b.taps[0], "data", b.taps[0].data[:-3])),
        "wrong rows": variant(lambda b: setattr(b.taps[1], "rows", b.taps[1].rows + 1)),
        "wrong cols": variant(lambda b: setattr(b.taps[0], "cols", 63)),
        "wrong bits": variant(lambda b: setattr(b.taps[0], "bits", 4)),
        "too few taps": variant(lambda b: b.taps.pop()),
        "targets in private": variant(lambda b: setattr(b, "targets", b"\0" * 8)),
        "step gap": variant(lambda b: setattr(b, "step", 5)),
    }
    for what, up in bad.items():
        with pytest.raises(grpc.RpcError) as e:
            _send(client, sid, up)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION), what
    # a wrong gradient reply in the U-shaped exchange
    with pytest.raises(grpc.RpcError) as e:
        _send(client, sid, pb.Upload(session_id=sid, batch=good),
              pb.Upload(session_id=sid, grad=pb.Grad(step=1, grad=qtensor(torch.zeros(2, 2), 32))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # bytes that are not a protobuf message at all
    raw = client.channel.stream_stream("/pocketllm.split.SideTuning/Train",
                                       request_serializer=lambda x: x,
                                       response_deserializer=lambda x: x)
    with pytest.raises(grpc.RpcError) as e:
        list(raw(iter([b"\xff\xfe\x00garbage\x07"]), metadata=client.md, timeout=180))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # over the message size limit (the test server takes 4 MiB)
    huge = variant(lambda b: setattr(b.taps[0], "data", bytes(5 * 2**20)))
    with pytest.raises(grpc.RpcError) as e:
        _send(client, sid, huge)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # nothing was trained by any of it, and the session still trains
    # a good batch without its gradient (the device went away mid-step) changes nothing either
    replies = _send(client, sid, pb.Upload(session_id=sid, batch=good))
    assert [r.WhichOneof("kind") for r in replies] == ["output"]
    assert client.open(sid, cfg) == 0
    assert client.health().status == "SERVING"
    client.close()
    _, _, acks = run_session(server.address, token_file, device, cfg, 2, sid=sid)
    assert [a[0] for a in acks] == [1, 2]


def test_a_step_in_parts_is_checked_part_by_part(server, token_file, device):
    """The device sends a step as one message per tap; the server reassembles them in order
    and refuses a part out of place, from another session or missing (stream cut short)."""
    from pocketllm.split.wire import read_token
    model, _, _, batcher = device
    cfg = side_config(model)
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    assert client.open(sid, cfg) == 0
    step = device_step(model, batcher(0), cfg, 1)
    parts = step.uploads
    assert len(parts) == len(cfg.taps) > 1
    assert [(p.batch.part, p.batch.parts, len(p.batch.taps)) for p in parts] == \
        [(i, len(parts), 1) for i in range(len(parts))]
    for p in parts:
        p.session_id = sid

    def copy(up, **batch_fields):
        out = pb.Upload()
        out.CopyFrom(up)
        for k, v in batch_fields.items():
            setattr(out.batch, k, v)
        return out
    swapped = [parts[1], parts[0], *parts[2:]]
    other = [parts[0], copy(parts[1], step=2), *parts[2:]]
    stranger = copy(parts[1])
    stranger.session_id = secrets.token_hex(16)
    for what, ups in {"out of order": swapped, "another step": other,
                      "another session": [parts[0], stranger, *parts[2:]],
                      "does not begin at part 0": parts[1:]}.items():
        with pytest.raises(grpc.RpcError) as e:
            _send(client, sid, *ups)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    # the stream ends before the last part: nothing trained, no reply
    assert _send(client, sid, *parts[:-1]) == []
    # the parts in order: the side network's output comes back (private labels)
    replies = _send(client, sid, *parts)
    assert [r.WhichOneof("kind") for r in replies] == ["output"]
    # the merged single message is the same step to the server
    replies = _send(client, sid, pb.Upload(session_id=sid, batch=step.msg))
    assert [r.WhichOneof("kind") for r in replies] == ["output"]
    assert client.open(sid, cfg) == 0  # none of it trained a step
    client.close()


def test_reconnect_after_network_drops_loses_and_repeats_nothing(server, token_file, device,
                                                                 reference):
    proxy = Proxy(server.port)
    cuts = {2, 4}
    try:
        client, sid, acks = run_session(proxy.address, token_file, device,
                                        side_config(device[0]), STEPS,
                                        on_ack=lambda s: proxy.cut() if s in cuts else None)
        step, side = client.fetch(sid)
    finally:
        proxy.close()
    assert [a[0] for a in acks] == list(range(1, STEPS + 1))
    assert [a[1] for a in acks] == [a[1] for a in reference[0]]
    assert same_weights(side, reference[1])


def test_server_sigkill_and_restart_resumes_every_session(tmp_path, token_file, device,
                                                          reference):
    srv = Server(tmp_path / "state", token_file).start()
    cfg = side_config(device[0])
    other_cfg = side_config(device[0], seed=7)
    try:
        c, other, _ = run_session(srv.address, token_file, device, other_cfg, 2)
        c.close()

        def kill_and_restart(step):
            if step == 3:
                srv.kill()
                srv.start()  # same port and state dir

        client, sid, acks = run_session(srv.address, token_file, device, cfg, STEPS,
                                        on_ack=kill_and_restart)
        _, side = client.fetch(sid)
        assert client.open(other, other_cfg) == 2  # the other session came back too
        client.close()
    finally:
        srv.stop()
    assert [a[0] for a in acks] == list(range(1, STEPS + 1))
    assert same_weights(side, reference[1])


def test_four_devices_train_concurrently(server, token_file, device):
    results, errors = {}, []

    def one(i):
        try:
            cfg = side_config(device[0], seed=i, private=i % 2 == 0)
            client, sid, acks = run_session(server.address, token_file, device, cfg, 3)
            results[i] = (acks, client.fetch(sid)[0])
            client.close()
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for acks, step in results.values():
        assert [a[0] for a in acks] == [1, 2, 3] and step == 3


def test_session_spec_is_fixed(server, token_file, device):
    from pocketllm.split.wire import read_token
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    client.open(sid, side_config(device[0]))
    with pytest.raises(grpc.RpcError) as e:
        client.open(sid, side_config(device[0], bits=4))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    spec = config_to_spec(side_config(device[0]))
    spec.model = "/etc/passwd"
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Open(pb.OpenRequest(session_id=secrets.token_hex(16), spec=spec),
                         metadata=client.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.close()
