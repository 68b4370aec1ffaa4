"""Numbers that must be finite, against a real `pocketllm serve` on loopback: every number a
client sends is checked, a step whose update would be non-finite is refused (nothing
non-finite is trained, checkpointed or acknowledged), and the session trains on."""

from __future__ import annotations

import math
import secrets
import threading

import grpc
import pytest
import torch

from pocketllm.split import split_pb2 as pb
from pocketllm.split.client import SplitClient, SplitError, device_step, qtensor
from pocketllm.split.wire import config_to_spec, read_token

from .harness import run_session, same_weights, side_config


def _finite(side) -> bool:
    return all(torch.isfinite(v).all() for v in side.state_dict().values())


def _send(client, *uploads):
    return list(client.stub.Train(iter(uploads), metadata=client.md, timeout=180))


@pytest.mark.parametrize("field,value", [
    ("learning_rate", math.inf), ("learning_rate", math.nan), ("learning_rate", -1e-3),
    ("learning_rate", 0.0), ("learning_rate", 1e6), ("weight_decay", math.nan),
    ("weight_decay", math.inf), ("weight_decay", -0.1), ("weight_decay", 1e4)])
def test_open_refuses_hyperparameters_out_of_range(server, token_file, device, field, value):
    client = SplitClient(server.address, read_token(token_file))
    spec = config_to_spec(side_config(device[0]))
    setattr(spec, field, value)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Open(pb.OpenRequest(session_id=secrets.token_hex(16), spec=spec),
                         metadata=client.md, timeout=120)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    client.close()


def test_the_client_checks_its_settings_before_it_connects(device):
    cfg = side_config(device[0])
    cfg.learning_rate = math.nan
    client = SplitClient("127.0.0.1:1", "x" * 32)  # nothing listens there: never reached
    with pytest.raises(SplitError, match="learning_rate"):
        list(client.steps(secrets.token_hex(16), cfg, None, 1, None, retry_seconds=1))
    client.close()


@pytest.mark.parametrize("scale", [3e38, 1e25])
def test_a_huge_gradient_is_refused_and_the_session_trains_on(server, token_file, device,
                                                              scale):
    """3e38 overflows the parameters' gradients; 1e25 only AdamW's second moment (its
    square): both would leave a non-finite side network or optimizer state."""
    model, _, _, batcher = device
    cfg = side_config(model)
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    assert client.open(sid, cfg) == 0
    up = pb.Upload(session_id=sid, batch=device_step(model, batcher(0), cfg, 1).msg)
    replies, got = [], threading.Event()

    def uploads():
        yield up
        if not got.wait(120):  # the side output first
            return
        d = replies[0].output.delta
        yield pb.Upload(session_id=sid, grad=pb.Grad(
            step=1, grad=qtensor(torch.full((d.rows, d.cols), scale), 32), loss=1.0))
    with pytest.raises(grpc.RpcError) as e:
        for r in client.stub.Train(uploads(), metadata=client.md, timeout=180):
            replies.append(r)
            got.set()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step 1" in e.value.details() and "not finite" in e.value.details()
    assert [r.WhichOneof("kind") for r in replies] == ["output"]  # never acknowledged
    step, side = client.fetch(sid)
    assert step == 0 and _finite(side)
    # the session trains on, as if the refused step had never been sent (optimizer included)
    _, _, acks = run_session(server.address, token_file, device, cfg, 2, sid=sid)
    assert [a[0] for a in acks] == [1, 2]
    _, side = client.fetch(sid)
    c, ref, _ = run_session(server.address, token_file, device, cfg, 2)
    _, ref_side = c.fetch(ref)
    c.close()
    assert _finite(side) and same_weights(side, ref_side)
    client.close()


def test_a_non_finite_gradient_or_loss_is_refused(server, token_file, device):
    model, _, _, batcher = device
    cfg = side_config(model)
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    assert client.open(sid, cfg) == 0
    batch = device_step(model, batcher(0), cfg, 1).msg
    rows = batch.taps[0].rows
    for grad, loss in ((torch.full((rows, cfg.hidden), math.nan), 1.0),
                       (torch.zeros(rows, cfg.hidden), math.inf),
                       (torch.zeros(rows, cfg.hidden), 1e39)):  # inf as the float32 it is
        with pytest.raises(grpc.RpcError) as e:
            _send(client, pb.Upload(session_id=sid, batch=batch),
                  pb.Upload(session_id=sid, grad=pb.Grad(step=1, grad=qtensor(grad, 32),
                                                         loss=loss)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.open(sid, cfg) == 0
    client.close()


def test_labels_sent_activations_that_overflow_the_loss_are_refused(server, token_file, device):
    """Finite activations (int8 scaled up to 2.5e38) that make the server's own loss non-finite:
    the step is refused, the session stays at its last step and trains on."""
    model, _, _, batcher = device
    cfg = side_config(model, private=False)
    client = SplitClient(server.address, read_token(token_file))
    sid = secrets.token_hex(16)
    assert client.open(sid, cfg) == 0
    b = device_step(model, batcher(0), cfg, 1).msg
    rows = b.final.rows
    b.final.scales = torch.full((rows,), 2e36).numpy().tobytes()  # x 127 at most: finite
    with pytest.raises(grpc.RpcError) as e:
        _send(client, pb.Upload(session_id=sid, batch=b))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step 1" in e.value.details() and "not finite" in e.value.details()
    step, side = client.fetch(sid)
    assert step == 0 and _finite(side)
    _, _, acks = run_session(server.address, token_file, device, cfg, 1, sid=sid)
    assert [a[0] for a in acks] == [1] and math.isfinite(acks[0][1])
    client.close()


def test_the_device_refuses_to_send_a_non_finite_gradient(server, token_file, device):
    """A device whose own head pass overflows gets a clear SplitError, sends nothing
    non-finite, and its session is left at the last acknowledged step."""
    model, _, _, batcher = device
    cfg = side_config(model)
    sid = secrets.token_hex(16)
    client = SplitClient(server.address, read_token(token_file))
    head = model.get_output_embeddings().weight.detach() * 3e38  # logits overflow
    with pytest.raises(SplitError, match="not finite"):
        client.train(sid, cfg, lambda s: device_step(model, batcher(s - 1), cfg, s), 2,
                     (head, None), lambda *a: None, retry_seconds=10)
    assert client.open(sid, cfg) == 0
    client.close()


def test_the_device_refuses_to_send_non_finite_activations(device):
    model, _, _, batcher = device
    cfg = side_config(model)
    layer = model.model.layers[0]
    h = layer.register_forward_hook(lambda m, i, o: (o[0] * math.inf, *o[1:])
                                    if isinstance(o, tuple) else o * math.inf)
    try:
        with pytest.raises(SplitError, match="tap 0.*not finite"):
            device_step(model, batcher(0), cfg, 1)
    finally:
        h.remove()
