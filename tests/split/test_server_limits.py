"""The split server's resource limits, against real `pocketllm serve` processes on loopback: side
network size, per-step memory, sessions per token and in all, LRU eviction, Delete."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time

import grpc
import pytest
import torch

from pocketllm.split import split_pb2 as pb
from pocketllm.split.client import SplitClient, SplitError, device_step, qtensor
from pocketllm.split.wire import config_to_spec, read_token

from .harness import Server, run_session, same_weights, side_config


def _open_raw(client, sid, cfg_or_spec):
    spec = cfg_or_spec if isinstance(cfg_or_spec, pb.SideSpec) else config_to_spec(cfg_or_spec)
    return client.stub.Open(pb.OpenRequest(session_id=sid, spec=spec), metadata=client.md,
                            timeout=120)


def _send(client, *uploads):
    return list(client.stub.Train(iter(uploads), metadata=client.md, timeout=180))


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_limits_are_printed_at_start_up(server):
    log = server.log.read_text()
    for flag in ("--max-side-params 8000000", "--max-step-mb 512", "--max-sessions 256",
                 "--max-sessions-per-token 64", "--max-resident-sessions 32"):
        assert flag in log, flag


def test_a_side_network_over_the_parameter_limit_is_refused(server, token_file, device):
    client = SplitClient(server.address, read_token(token_file))
    cfg = side_config(device[0])
    cfg.width, cfg.depth = 512, 16  # 2 taps x 16 blocks x 4 x 512^2: 33.6M parameters
    with pytest.raises(grpc.RpcError) as e:
        _open_raw(client, secrets.token_hex(16), cfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    from pocketllm.split.side import SideNetwork, side_memory, side_params
    n = side_params(cfg)
    assert n > 8_000_000
    assert f"{n:,}" in e.value.details() and "--max-side-params 8,000,000" in e.value.details()
    # each bound alone is met, their product is 34 billion parameters: refused at once
    cfg.width = 16384
    t0 = time.time()
    with pytest.raises(grpc.RpcError) as e:
        _open_raw(client, secrets.token_hex(16), cfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{side_params(cfg):,}" in e.value.details() and time.time() - t0 < 30
    # taps beyond the model's layers (tiny-llama has 2) are refused, not built
    cfg = side_config(device[0])
    cfg.taps = list(range(512))
    with pytest.raises(grpc.RpcError) as e:
        _open_raw(client, secrets.token_hex(16), cfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layers" in e.value.details()
    # the counts are the network's own
    for w, d, taps in ((16, 1, [0, 1]), (8, 0, [1]), (24, 3, [0, 1])):
        cfg.width, cfg.depth, cfg.taps = w, d, taps
        net = SideNetwork(cfg)
        assert side_params(cfg) == sum(p.numel() for p in net.parameters())
        assert side_memory(cfg) == 12 * side_params(cfg) + 8192 * len(list(net.modules()))
    client.close()


def _labels_sent_step(device, cfg, step, rows=None, n_candidates=0):
    """A labels-sent step of `rows` rows (random activations), in one message."""
    model = device[0]
    if rows is None:
        return device_step(model, device[3](step - 1), cfg, step).msg
    g = torch.Generator().manual_seed(step)
    b = pb.Batch(step=step)
    for _ in cfg.taps:
        qtensor(torch.randn(rows, cfg.hidden, generator=g), cfg.act_bits, b.taps.add())
    qtensor(torch.randn(rows, cfg.hidden, generator=g), cfg.act_bits, b.final)
    vocab = model.config.vocab_size
    if n_candidates:
        cands = torch.randint(0, vocab, (rows, n_candidates), generator=g, dtype=torch.int32)
        b.candidates, b.n_candidates = cands.numpy().astype("<i4").tobytes(), n_candidates
        targets = torch.randint(0, n_candidates, (rows,), generator=g, dtype=torch.int32)
    else:
        targets = torch.randint(0, vocab, (rows,), generator=g, dtype=torch.int32)
    b.targets = targets.numpy().astype("<i4").tobytes()
    return b


def test_a_step_over_the_memory_limit_is_refused_before_its_parts_are_read(
        tmp_path, token_file, device):
    srv = Server(tmp_path / "state", token_file, args=("--max-step-mb", 4)).start()
    try:
        client = SplitClient(srv.address, read_token(token_file))
        cfg = side_config(device[0], private=False)
        sid = secrets.token_hex(16)
        assert _open_raw(client, sid, cfg).created
        # part 0 of 2 declares 20000 rows: ~130 MB of server memory, over the 4 MB limit. The
        # refusal comes on part 0 alone (today's server waits for part 1 and says nothing).
        big = _labels_sent_step(device, cfg, 1, rows=20000)
        part0 = pb.Upload(session_id=sid, batch=pb.Batch(step=1, part=0, parts=2))
        part0.batch.taps.add().CopyFrom(big.taps[0])
        with pytest.raises(grpc.RpcError) as e:
            _send(client, part0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        from pocketllm.split.side import step_memory
        need = step_memory(cfg, 20000, 0, vocab=260)  # tiny-llama's vocabulary
        assert "--max-step-mb 4" in e.value.details()
        assert f"{need / 2**20:.1f} MB" in e.value.details() and "20000 rows" in e.value.details()
        # a small step with long candidate lists: the estimate counts the candidates
        cand = _labels_sent_step(device, cfg, 1, rows=200, n_candidates=1024)
        assert step_memory(cfg, 200, 0, 260) < 4 * 2**20 < step_memory(cfg, 200, 1024, 260)
        with pytest.raises(grpc.RpcError) as e:
            _send(client, pb.Upload(session_id=sid, batch=cand))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1024 candidates" in e.value.details() and "--max-step-mb 4" in e.value.details()
        # a step within the limit trains
        replies = _send(client, pb.Upload(session_id=sid, batch=_labels_sent_step(device, cfg, 1)))
        assert [r.ack.step for r in replies] == [1]
        client.close()
    finally:
        srv.stop()


def test_long_candidate_lists_do_not_multiply_the_step_in_server_memory(tmp_path, token_file,
                                                                       device):
    """900 rows x 1024 label words: 3.7 MB on the wire. Gathering each row's candidate head
    rows (N, C, H) took 236 MB more; the server now streams them in blocks."""
    srv = Server(tmp_path / "state", token_file).start()
    try:
        client = SplitClient(srv.address, read_token(token_file))
        cfg = side_config(device[0], private=False)
        sid = secrets.token_hex(16)
        assert _open_raw(client, sid, cfg).created
        # warm up: the head is loaded and one small step trained
        _send(client, pb.Upload(session_id=sid, batch=_labels_sent_step(device, cfg, 1)))
        before = _peak_rss_mb(srv.proc.pid)
        step = _labels_sent_step(device, cfg, 2, rows=900, n_candidates=1024)
        replies = _send(client, pb.Upload(session_id=sid, batch=step))
        assert [r.ack.step for r in replies] == [2]
        grown = _peak_rss_mb(srv.proc.pid) - before
        assert grown < 64, grown
        from pocketllm.split.side import step_memory
        bound = step_memory(cfg, 900, 1024, vocab=260) / 2**20
        assert grown <= bound + 8, (grown, bound)   # 8 MB: allocator slack
        assert bound < 64 < 236
        client.close()
    finally:
        srv.stop()


def test_sessions_per_token_and_in_all_are_limited_and_delete_frees_a_place(tmp_path, device):
    tokens = [secrets.token_hex(16), secrets.token_hex(16)]
    tf = tmp_path / "tokens"
    tf.write_text("# one token per device owner\n" + "\n".join(tokens) + "\n")
    srv = Server(tmp_path / "state", tf, args=("--max-sessions", 3,
                                                "--max-sessions-per-token", 2)).start()
    cfg = side_config(device[0])
    a, b = (SplitClient(srv.address, t) for t in tokens)
    try:
        sa = [secrets.token_hex(16) for _ in range(3)]
        assert [_open_raw(a, s, cfg).created for s in sa[:2]] == [True, True]
        with pytest.raises(grpc.RpcError) as e:
            _open_raw(a, sa[2], cfg)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-sessions-per-token 2" in e.value.details()
        assert "Delete" in e.value.details()
        assert not _open_raw(a, sa[0], cfg).created  # rejoining one is not a new session
        sb = [secrets.token_hex(16) for _ in range(2)]
        assert _open_raw(b, sb[0], cfg).created
        with pytest.raises(grpc.RpcError) as e:
            _open_raw(b, sb[1], cfg)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-sessions 3" in e.value.details()
        # a session belongs to the token that opened it: the other gets NOT_FOUND (and
        # cannot take its id)
        for call in (lambda: b.fetch(sa[0]), lambda: b.delete(sa[0])):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            _open_raw(b, sa[0], cfg)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # the client library reports a full server at once (no retrying for minutes)
        t0 = time.time()
        with pytest.raises(SplitError, match="--max-sessions 3"):
            run_session(srv.address, _one(tmp_path, tokens[1]), device, cfg, 1, sid=sb[1],
                        retry_seconds=60)
        assert time.time() - t0 < 30
        # the owners and counts survive a restart
        srv.stop()
        srv.start()
        with pytest.raises(grpc.RpcError) as e:
            _open_raw(a, sa[2], cfg)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # deleting frees a place, for its owner only
        assert a.delete(sa[1]) == 0
        assert not any(srv.state_dir.glob(hashlib.sha256(sa[1].encode()).hexdigest()[:32] + "*"))
        with pytest.raises(grpc.RpcError) as e:
            a.fetch(sa[1])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert _open_raw(a, sa[2], cfg).created
    finally:
        a.close()
        b.close()
        srv.stop()


def _one(tmp_path, token):
    p = tmp_path / f"token-{token[:4]}"
    p.write_text(token)
    return p


def test_delete_needs_the_token_and_an_idle_session(server, token_file, device):
    client = SplitClient(server.address, read_token(token_file))
    model, _, _, batcher = device
    cfg = side_config(model)
    _, sid, acks = run_session(server.address, token_file, device, cfg, 1)
    assert acks[0][0] == 1
    bad = SplitClient(server.address, "x" * 32)
    with pytest.raises(grpc.RpcError) as e:
        bad.delete(sid)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad.close()
    # a stream holding the session mid-step (private labels: waiting for the gradient)
    hold = threading.Event()

    def uploads():
        yield pb.Upload(session_id=sid, batch=device_step(model, batcher(1), cfg, 2).msg)
        hold.wait(60)
    call = client.stub.Train(uploads(), metadata=client.md, timeout=180)
    it = iter(call)
    assert next(it).WhichOneof("kind") == "output"
    with pytest.raises(grpc.RpcError) as e:
        client.delete(sid)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "training" in e.value.details()
    call.cancel()
    hold.set()
    deadline = time.time() + 30
    while True:
        try:
            assert client.delete(sid) == 1
            break
        except grpc.RpcError as e:  # the cancelled stream may take a moment to let go
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and time.time() < deadline
            time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as e:
        client.delete(sid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_train_delete_session_removes_it_from_the_server(server, token_file, tmp_path):
    from pocketllm.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--method", "side", "--model", "tiny-llama", "--server", server.address,
               "--token-file", str(token_file), "--iters", "2", "--batch-size", "2",
               "--adapter-path", str(out), "--val-batches", "1", "--eval-batch-size", "4",
               "--side-width", "8", "--delete-session"])
    assert rc == 0
    assert (out / "side_network.safetensors").exists()
    sid = json.loads((out / "session.json").read_text())["session_id"]
    h = hashlib.sha256(sid.encode()).hexdigest()[:32]
    assert not (server.state_dir / f"{h}.pt").exists()
    client = SplitClient(server.address, read_token(token_file))
    with pytest.raises(grpc.RpcError) as e:
        client.fetch(sid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_idle_sessions_are_evicted_and_resume_exactly(tmp_path, token_file, device):
    """Two sessions in memory at most: training four sessions in turn evicts the least recently
    used ones to their checkpoints; each resumes from there, bit-identical to a run never
    evicted."""
    srv = Server(tmp_path / "state", token_file,
                 args=("--max-resident-sessions", 2, "--max-streams", 1, "--workers", 1)).start()
    cfg = side_config(device[0])
    try:
        c, ref, _ = run_session(srv.address, token_file, device, cfg, 4)
        _, ref_side = c.fetch(ref)
        c.close()
        c, sid, _ = run_session(srv.address, token_file, device, cfg, 2)
        c.close()
        for seed in (1, 2):  # two more sessions push `sid` out of memory
            run_session(srv.address, token_file, device, side_config(device[0], seed=seed),
                        1)[0].close()
        log = srv.log.read_text()
        tag = hashlib.sha256(sid.encode()).hexdigest()[:8]
        assert f"session {tag}: evicted" in log
        c, _, acks = run_session(srv.address, token_file, device, cfg, 4, sid=sid)
        _, side = c.fetch(sid)
        c.close()
        assert [a[0] for a in acks] == [3, 4]
        assert same_weights(side, ref_side)
        assert f"session {tag}: loaded" in srv.log.read_text()
    finally:
        srv.stop()
    # resident sessions must cover the streams and workers (each RPC pins at most one session)
    bad = Server(tmp_path / "state2", token_file,
                 args=("--max-resident-sessions", 2, "--workers", 4))
    with pytest.raises(RuntimeError, match="--max-resident-sessions"):
        bad.start()


def test_eviction_never_takes_a_session_a_stream_holds(tmp_path):
    """The lease and eviction agree: a session with a holder (its stream's lease) stays in
    memory even if nothing else pins it; only an unheld, unpinned one is evicted."""
    from pocketllm.config import ServeArgs
    from pocketllm.split.server import Full, Heads, Session, SideTuningServicer
    from pocketllm.split.side import SideConfig
    cfg = SideConfig(model="tiny-llama", hidden=16, taps=[0], width=4, depth=1)
    srv = SideTuningServicer(["t" * 32], tmp_path, Heads([]),
                             ServeArgs(max_resident_sessions=2, max_streams=1, workers=1))
    try:
        held, idle = (Session(f"{i:032x}", cfg, tmp_path / f"{i}.pt", "o") for i in (1, 2))
        for s in (held, idle):
            s.build()
            s.resident = True
            srv.sessions[s.sid_hash] = s
        held.holder = object()  # a stream's lease, its pin already gone
        held.last_used = idle.last_used - 1  # the least recently used one
        with srv._lock:
            srv._evict_for(1)
        assert held.net is not None and held.resident
        assert idle.net is None and not idle.resident
        with srv._lock, pytest.raises(Full, match="--max-resident-sessions 2"):
            srv._evict_for(2)
        assert held.net is not None
    finally:
        srv.close()
