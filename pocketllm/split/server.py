"""`pocketllm serve`: the gRPC service that trains side networks on devices' activations.

Every device session (keyed by a client-chosen random id) holds a side network and its AdamW
state. A step is acknowledged only once it is trained *and* checkpointed (atomically: temp file,
fsync, rename), so what a client hears acknowledged survives a SIGKILL; a restarted server loads
every session from the state directory and a reconnecting client resumes after the step it last
heard acknowledged. Steps already trained are acknowledged again without training (`duplicate`;
with private labels, where the device would wait for a side output, refused with ABORTED and the
session's step, so that it reopens), a step beyond the next one is refused: no batch is lost or
trained twice.

Every RPC but Health needs the token (constant-time compare), checked before the request's bytes
are decoded; a session's files are named by a hash of its id, so neither logs nor the state
directory reveal ids. A malformed payload aborts only its own stream with INVALID_ARGUMENT; the
server keeps serving everyone else.

Availability (`--max-streams`, `--stream-idle-s`, `--session-lease-s`, `--keepalive-s`): a Train
stream holds a worker thread for its whole life, so streams get their own slots and the short
calls (Health, Open, Fetch) their own `--workers`; a stream beyond the slots is refused with
RESOURCE_EXHAUSTED (and a retry-after), a stream silent for `--stream-idle-s` is closed, a dead or
frozen peer's connection is dropped by keepalive pings, and a session whose stream has been
silent for `--session-lease-s` is handed to the next stream that asks for it (its device's
reconnect or `--resume`). Steps stay exact through a takeover: the step counter decides what is
trained, under the session's lock, and only the stream holding the session trains it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch

from . import split_pb2 as pb
from .quant import quantize
from .side import SideConfig, SideNetwork, head_loss_grad, side_to_bytes
from .wire import (RETRY_AFTER, TOKEN_HEADER, decode_tensor, read_token, session_id_problem,
                   spec_to_config)

log = logging.getLogger("pocketllm.serve")
SERVICE = "pocketllm.split.SideTuning"
PUBLIC_RPCS = {"Health"}  # every other RPC needs the token
MAX_DETAILS = 300  # characters of a refusal's message: never a client's 100 KB value echoed back
CORRUPT = ".corrupt"  # an unreadable checkpoint is renamed <hash>.corrupt, never overwritten


def _clip(value, n: int = 40) -> str:
    """repr(value), cut to about n characters: what a refusal may echo of a client's input."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}...({len(r)} chars)"


def _refuse(context, code: grpc.StatusCode, msg: str, retry_after: float | None = None):
    """End the RPC with `code` and a bounded message; `retry_after` (seconds) tells the device
    the refusal is worth retrying, and when."""
    if retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER, f"{retry_after:.1f}"),))
    context.abort(code, msg if len(msg) <= MAX_DETAILS else msg[:MAX_DETAILS] + "...")


def _parse(cls, data: bytes, context):
    """The request message in `data`, or INVALID_ARGUMENT (gRPC's own decoding answers INTERNAL,
    logs a traceback per call, and can leave a stream's status unsent so that stop() hangs)."""
    try:
        return cls.FromString(data)
    except Exception:  # DecodeError, or a message nested past protobuf's recursion limit
        _refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid {cls.DESCRIPTOR.name} message")


def _cancel(context, code: grpc.StatusCode, msg: str) -> None:
    """End another thread's RPC now (it may be blocked reading from or writing to its peer).
    The device hears `code` and `msg` where this gRPC version allows it (its call object's
    cancel-with-status), else a plain CANCELLED; the server log says why either way."""
    try:
        context._rpc_event.call.cancel(code.value[0], msg)
    except Exception:  # a gRPC without that internal: the public cancel
        context.cancel()


class _Stream:
    """One Train stream: when it last heard from its device (idle timeout, session lease)."""

    def __init__(self, context):
        self.context = context
        self.seen = time.monotonic()

    def touch(self) -> None:
        self.seen = time.monotonic()

    def silent_s(self) -> float:
        return time.monotonic() - self.seen


class Session:
    def __init__(self, sid_hash: str, cfg: SideConfig, path: Path):
        self.sid_hash, self.cfg, self.path = sid_hash, cfg, path
        self.net = SideNetwork(cfg)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate,
                                     weight_decay=cfg.weight_decay)
        self.step = 0
        self.holder: _Stream | None = None  # the one stream training the session (its lease)
        self.state_lock = threading.Lock()  # net, optimizer, step and holder change together

    @property
    def tag(self) -> str:
        return self.sid_hash[:8]

    def save(self) -> None:
        """Atomic checkpoint: a crash leaves the previous one or this one, never a torn file."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save({"config": self.cfg.to_json(), "step": self.step,
                        "net": self.net.state_dict(), "opt": self.opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @classmethod
    def load(cls, path: Path) -> "Session":
        state = torch.load(path, weights_only=True)
        s = cls(path.stem, SideConfig.from_json(state["config"]), path)
        s.net.load_state_dict(state["net"])
        s.opt.load_state_dict(state["opt"])
        s.step = int(state["step"])
        return s


class Heads:
    """Output-head rows of the public models the server accepts, loaded once each."""

    def __init__(self, allowed: list[str]):
        self.allowed = set(allowed)
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in self.allowed:
            raise ValueError(f"model {_clip(name)} is not served here; this server serves "
                             f"{', '.join(sorted(self.allowed))}")
        with self._lock:
            if name not in self._heads:
                from ..loss import output_head
                from ..models import load_model
                model, _ = load_model(name, "float32")
                if getattr(model.config, "final_logit_softcapping", None):
                    raise ValueError(f"model {_clip(name)} soft-caps its logits: not supported")
                head = output_head(model)
                bias = getattr(head, "bias", None)
                self._heads[name] = (head.weight.detach().clone(),
                                     None if bias is None else bias.detach().clone())
                del model
            return self._heads[name]


class SideTuningServicer:
    def __init__(self, token: str, state_dir: Path, heads: Heads, max_streams: int = 16,
                 stream_idle_s: float = 120.0, session_lease_s: float = 60.0):
        self._token = token.encode()
        self.state_dir = state_dir
        self.heads = heads
        self.sessions: dict[str, Session] = {}
        self.corrupt: dict[str, str] = {}  # session hash -> its unreadable checkpoint, kept aside
        self._lock = threading.Lock()
        self.max_streams, self.idle_s, self.lease_s = max_streams, stream_idle_s, session_lease_s
        self._slots = threading.BoundedSemaphore(max_streams)
        self._streams: set[_Stream] = set()
        self._closed = threading.Event()
        for path in sorted(state_dir.glob(f"*{CORRUPT}*")):
            self.corrupt[path.name.split(".")[0]] = path.name
        for path in sorted(state_dir.glob("*.pt")):
            try:
                s = Session.load(path)
            except Exception as e:  # one bad file must not keep the others down
                # kept aside: its device's --resume must fail, not restart the session at step 0
                # and overwrite the only copy of its training
                kept = path.with_name(path.stem + CORRUPT)
                n = 0
                while kept.exists():
                    n += 1
                    kept = path.with_name(f"{path.stem}{CORRUPT}.{n}")
                os.replace(path, kept)
                self.corrupt[path.stem] = kept.name
                log.error("session %s: checkpoint %s unreadable (%s); kept as %s, the session "
                          "is refused until an operator restores or deletes it", path.stem[:8],
                          path.name, str(e)[:200], kept.name)
                continue
            self.sessions[s.sid_hash] = s
            log.info("session %s: restored at step %d", s.tag, s.step)
        threading.Thread(target=self._watch, name="stream-watchdog", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    # -- helpers ----------------------------------------------------------------------------
    def _auth(self, context) -> None:
        given = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        expected = b"Bearer " + self._token
        if not hmac.compare_digest(given.encode(), expected):
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "invalid token")

    @staticmethod
    def _hash(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()[:32]

    def _unreadable(self, h: str, context) -> None:
        if h in self.corrupt:
            _refuse(context, grpc.StatusCode.DATA_LOSS,
                    f"this session's checkpoint on the server is unreadable (kept aside as "
                    f"{self.corrupt[h]}): it cannot be resumed; start a new run without "
                    "--resume, or have the server's operator restore the file")

    def _session(self, sid: str, context) -> Session:
        if not 16 <= len(sid) <= 128:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "session id must be 16..128 chars")
        h = self._hash(sid)
        s = self.sessions.get(h)
        if s is None:
            self._unreadable(h, context)
            _refuse(context, grpc.StatusCode.NOT_FOUND, "no such session; call Open first")
        return s

    def _claim(self, s: Session, me: _Stream, context) -> None:
        """Make `me` the stream training `s`: at once if no stream holds it, else only once the
        holder's lease has expired (it sent nothing for --session-lease-s: a frozen device, a
        half-open connection); the holder is then cut off and can never train again."""
        with s.state_lock:
            old = s.holder
            if old is not None:
                silent = old.silent_s()
                if silent < self.lease_s:
                    left = self.lease_s - silent
                    _refuse(context, grpc.StatusCode.ABORTED,
                            f"session busy: another stream of it (a device still running this "
                            f"run, or a frozen one) sent its last message {silent:.0f} s ago; its "
                            f"lease expires in {left:.0f} s (server --session-lease-s "
                            f"{self.lease_s:g}), then this session can be taken over",
                            retry_after=left)
                log.warning("session %s: taken over from a stream silent for %.0f s (lease %g s)",
                            s.tag, silent, self.lease_s)
                _cancel(old.context, grpc.StatusCode.ABORTED,
                        f"session taken over by another stream after {silent:.0f} s without a "
                        "message from this one")
            s.holder = me

    def _release(self, s: Session, me: _Stream) -> None:
        with s.state_lock:
            if s.holder is me:
                s.holder = None

    def _watch(self) -> None:
        """Close streams silent for --stream-idle-s: each holds a worker thread and a slot."""
        period = min(1.0, self.idle_s / 4)
        while not self._closed.wait(period):
            with self._lock:
                idle = [st for st in self._streams if st.silent_s() > self.idle_s]
            for st in idle:
                log.warning("stream closed: no message for %g s (--stream-idle-s)", self.idle_s)
                _cancel(st.context, grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no message for {self.idle_s:g} s (server --stream-idle-s): stream "
                        "closed; reconnect to continue")
                with self._lock:
                    self._streams.discard(st)

    # -- RPCs (requests arrive decoded and, but for Health, authenticated: `add_to_server`) --
    def Health(self, request, context):
        return pb.HealthReply(status="SERVING")  # nothing else to a caller without a token

    def Open(self, request, context):
        sid = request.session_id
        problem = session_id_problem(sid)
        if problem:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        h = self._hash(sid)
        self._unreadable(h, context)
        cfg = spec_to_config(request.spec)
        try:
            cfg.check()
            weight, _ = self.heads.get(cfg.model)
            if weight.shape[1] != cfg.hidden:
                raise ValueError(f"model {_clip(cfg.model)} has hidden size {weight.shape[1]}, "
                                 f"not {cfg.hidden}")
        except ValueError as e:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._lock:
            s = self.sessions.get(h)
            if s is not None:
                if s.cfg != cfg:
                    _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                            "session exists with another side network spec")
                log.info("session %s: opened at step %d", s.tag, s.step)
                return pb.OpenReply(step=s.step, created=False)
            s = Session(h, cfg, self.state_dir / f"{h}.pt")
            s.save()
            self.sessions[h] = s
        log.info("session %s: created (%s, %d taps, width %d, depth %d, %d bits, %s labels)",
                 s.tag, cfg.model, len(cfg.taps), cfg.width, cfg.depth, cfg.act_bits,
                 "private" if cfg.private_labels else "sent")
        return pb.OpenReply(step=0, created=True)

    def Fetch(self, request, context):
        s = self._session(request.session_id, context)
        with s.state_lock:
            blob, step = side_to_bytes(s.net), s.step
        log.info("session %s: side network fetched at step %d", s.tag, step)
        return pb.FetchReply(step=step, safetensors=blob)

    def Train(self, request_iterator, context):
        if not self._slots.acquire(blocking=False):
            _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"all {self.max_streams} stream slots are busy (server --max-streams); retry",
                    retry_after=1.0)
        me = _Stream(context)
        with self._lock:
            self._streams.add(me)

        def heard(it):  # every message read, whoever reads it, renews the stream's lease
            for up in it:
                me.touch()
                yield up
        request_iterator = heard(request_iterator)
        s: Session | None = None
        trained = 0
        try:
            for up in request_iterator:
                if s is None:
                    s = self._session(up.session_id, context)
                    try:
                        self._claim(s, me, context)
                    except BaseException:
                        s = None  # not ours: nothing to release
                        raise
                    log.info("session %s: stream opened at step %d", s.tag, s.step)
                elif self._hash(up.session_id) != s.sid_hash:
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "one session per stream")
                if up.WhichOneof("kind") != "batch":
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected a batch")
                try:
                    b = _whole(up, request_iterator, s.cfg)
                except ValueError as e:
                    log.warning("session %s: step %d rejected: %s", s.tag, up.batch.step, e)
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"step {up.batch.step}: {e}")
                if b is None:
                    return  # client gone mid-step: nothing was changed
                if b.step <= s.step:
                    if s.cfg.private_labels:
                        # a duplicate ack would leave the device waiting for the side output
                        # of a step it need not compute: tell it where the session is instead
                        _refuse(context, grpc.StatusCode.ABORTED,
                                f"step {b.step} is already trained (another stream of this "
                                f"session took it to step {s.step}): reopen the session and "
                                f"continue after step {s.step}", retry_after=0.0)
                    yield pb.Reply(ack=pb.Ack(step=b.step, duplicate=True))
                    continue
                if b.step != s.step + 1:
                    _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                            f"step {b.step} sent, the session is at step {s.step}")
                try:
                    taps, final, targets, cands = self._decode(s.cfg, b)
                except ValueError as e:
                    log.warning("session %s: step %d rejected: %s", s.tag, b.step, e)
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"step {b.step}: {e}")
                delta = s.net(taps)
                if s.cfg.private_labels:
                    data, _ = quantize(delta, 32)
                    yield pb.Reply(output=pb.SideOutput(step=b.step, delta=pb.QTensor(
                        bits=32, rows=delta.shape[0], cols=delta.shape[1], data=data)))
                    g = next(request_iterator, None)
                    if g is None:
                        return  # client gone mid-step: nothing was changed
                    try:
                        if g.WhichOneof("kind") != "grad" or g.grad.step != b.step:
                            raise ValueError("expected the gradient of this step")
                        gz = decode_tensor(g.grad.grad, *delta.shape, "grad", (32, 16))
                    except ValueError as e:
                        _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"step {b.step}: {e}")
                    loss = float(g.grad.loss)
                else:
                    weight, bias = self.heads.get(s.cfg.model)
                    loss, gz = head_loss_grad(final + delta.detach(), targets, weight, bias,
                                              candidates=cands)
                with s.state_lock:
                    if s.holder is not me:  # taken over while this step was on its way
                        _refuse(context, grpc.StatusCode.ABORTED,
                                "session taken over by another stream; reopen it")
                    s.opt.zero_grad(set_to_none=True)
                    delta.backward(gz)
                    s.opt.step()
                    s.step += 1
                    s.save()
                trained += 1
                me.touch()  # the training was ours, not the device's silence
                yield pb.Reply(ack=pb.Ack(step=s.step, loss=loss))
        finally:
            if s is not None:
                log.info("session %s: stream closed at step %d (%d steps trained)",
                         s.tag, s.step, trained)
                self._release(s, me)
            with self._lock:
                self._streams.discard(me)
            self._slots.release()

    def _decode(self, cfg: SideConfig, b: pb.Batch):
        if len(b.taps) != len(cfg.taps):
            raise ValueError(f"{len(b.taps)} taps sent, the session takes {len(cfg.taps)}")
        rows = b.taps[0].rows
        if rows > 1 << 20:
            raise ValueError(f"{rows} rows is too many")
        bits = (cfg.act_bits,)
        taps = [decode_tensor(t, rows, cfg.hidden, f"tap {i}", bits) for i, t in enumerate(b.taps)]
        if cfg.private_labels:
            if b.targets or b.HasField("final"):
                raise ValueError("targets / final state sent to a private-labels session")
            return taps, None, None, None
        final = decode_tensor(b.final, rows, cfg.hidden, "final", bits)
        vocab = self.heads.get(cfg.model)[0].shape[0]
        targets = _ids(b.targets, rows, 1, vocab if not b.n_candidates else b.n_candidates,
                       "targets")[:, 0]
        cands = None
        if b.n_candidates:
            if b.n_candidates > 1024:
                raise ValueError(f"{b.n_candidates} label words is too many")
            cands = _ids(b.candidates, rows, b.n_candidates, vocab, "candidates")
        return taps, final, targets, cands


def _whole(up: pb.Upload, rest: Iterator[pb.Upload], cfg: SideConfig) -> pb.Batch | None:
    """The step whose batch `up` begins, reading its other parts (`Batch.parts` > 1) from
    `rest`; None if the stream ends before the last part, ValueError on a part out of place."""
    first = up.batch
    n = first.parts
    if n <= 1 and first.part == 0:
        return first
    if first.part != 0 or n > len(cfg.taps):
        raise ValueError(f"part {first.part} of {n} begins the step (the session takes "
                         f"{len(cfg.taps)} taps, at most one part each)")
    whole = pb.Batch()
    whole.CopyFrom(first)
    for i in range(1, n):
        nxt = next(rest, None)
        if nxt is None:
            return None
        b = nxt.batch
        if nxt.session_id != up.session_id:
            raise ValueError("one session per stream")
        if nxt.WhichOneof("kind") != "batch" or (b.step, b.part, b.parts) != (first.step, i, n):
            raise ValueError(f"expected part {i} of {n} of step {first.step}")
        whole.MergeFrom(b)  # repeated taps append in order; final / targets come with the last
    return whole


def _ids(data: bytes, rows: int, cols: int, bound: int, what: str) -> torch.Tensor:
    """(rows, cols) int32 ids in [0, bound) from little-endian bytes, else ValueError."""
    if len(data) != 4 * rows * cols:
        raise ValueError(f"{what}: {len(data)} bytes for {rows} x {cols} ids")
    ids = torch.frombuffer(bytearray(data), dtype=torch.int32).long().reshape(rows, cols)
    if ids.numel() and (ids.min() < 0 or ids.max() >= bound):
        raise ValueError(f"{what}: id out of range (0..{bound - 1})")
    return ids


def add_to_server(servicer: SideTuningServicer, server) -> None:
    """Register the service from split.proto's descriptor, its requests taken as raw bytes: each
    RPC checks the token (all but PUBLIC_RPCS) before decoding anything, and bytes that are not
    its message get INVALID_ARGUMENT (`_parse`), not gRPC's INTERNAL and a logged traceback."""
    rpcs = {}
    for m in pb.DESCRIPTOR.services_by_name["SideTuning"].methods:
        reply = getattr(pb, m.output_type.name).SerializeToString
        request = getattr(pb, m.input_type.name)
        method, public = getattr(servicer, m.name), m.name in PUBLIC_RPCS
        if m.client_streaming and m.server_streaming:
            def stream(raw_iter, context, method=method, request=request, public=public):
                if not public:
                    servicer._auth(context)
                yield from method((_parse(request, raw, context) for raw in raw_iter), context)
            rpcs[m.name] = grpc.stream_stream_rpc_method_handler(stream, None, reply)
        elif not (m.client_streaming or m.server_streaming):
            def unary(raw, context, method=method, request=request, public=public):
                if not public:
                    servicer._auth(context)
                return method(_parse(request, raw, context), context)
            rpcs[m.name] = grpc.unary_unary_rpc_method_handler(unary, None, reply)
        else:
            raise NotImplementedError(f"{m.name}: only unary and bidirectional RPCs are served")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, rpcs),))
    server.add_registered_method_handlers(SERVICE, rpcs)


def availability_limits(args) -> list[str]:
    """The availability limits `pocketllm serve` prints at start-up, one line each."""
    return [f"{args.max_streams} Train streams at once (--max-streams), "
            f"{args.workers} more workers for Health/Open/Fetch (--workers)",
            f"a stream silent for {args.stream_idle_s:g} s is closed (--stream-idle-s)",
            f"a session silent for {args.session_lease_s:g} s can be taken over by its device's "
            "reconnect (--session-lease-s)",
            f"keepalive: a connection idle {args.keepalive_s:g} s is pinged, dropped without "
            f"an answer in {args.keepalive_s:g} s (--keepalive-s)",
            f"SIGTERM: streams get {args.shutdown_grace_s:g} s to finish (--shutdown-grace-s)"]


def _check_limits(args) -> None:
    import math
    for name in ("max_streams", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("stream_idle_s", "session_lease_s", "keepalive_s", "shutdown_grace_s"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                             f"got {v}")


def make_server(token: str, state_dir: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 0, models: list[str] | None = None, max_message_mb: int = 64,
                workers: int = 8, tls_cert: str = "", tls_key: str = "", max_streams: int = 16,
                stream_idle_s: float = 120.0, session_lease_s: float = 60.0,
                keepalive_s: float = 30.0):
    """(grpc server, bound port, servicer) -- started."""
    from ..models import ALIASES, TINY_CONFIGS
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    heads = Heads(models or [*ALIASES, *TINY_CONFIGS])
    limit = max_message_mb * 2**20
    ping_ms = int(keepalive_s * 1000)
    # a Train stream holds its thread for its whole life: one per stream slot, and `workers`
    # more, so that no number of streams can keep Health, Open or Fetch waiting
    pool = futures.ThreadPoolExecutor(max_workers=max_streams + workers)
    server = grpc.server(pool, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # ping every connection that has been quiet this long, also between messages of an
        # idle stream; no answer within the same time (a dead or frozen peer) closes it, and
        # with it its streams
        ("grpc.keepalive_time_ms", ping_ms), ("grpc.keepalive_timeout_ms", ping_ms),
        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.ping_timeout_ms", ping_ms),  # gRPC 1.7x waits 1 min for any ping's ack
        # devices ping too (client.KEEPALIVE_MS): accepted down to every 10 s
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
    servicer = SideTuningServicer(token, state, heads, max_streams, stream_idle_s,
                                  session_lease_s)
    add_to_server(servicer, server)
    addr = f"{host}:{port}"
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(),
                                              Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(addr, creds)
    else:
        bound = server.add_insecure_port(addr)
    if not bound:
        raise SystemExit(f"cannot listen on {addr}")
    server.start()
    return server, bound, servicer


def serve(args) -> int:
    """Run until SIGTERM/SIGINT (a SIGKILL loses nothing acknowledged)."""
    import signal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _check_limits(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    server, port, servicer = make_server(
        read_token(args.token_file), args.state_dir, args.host, args.port,
        list(args.models) or None, args.max_message_mb, args.workers, args.tls_cert,
        args.tls_key, args.max_streams, args.stream_idle_s, args.session_lease_s,
        args.keepalive_s)
    log.info("serving on %s:%d (state in %s)", args.host, port, args.state_dir)
    for line in availability_limits(args):
        log.info("limit: %s", line)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("stopping: streams get %g s to finish", args.shutdown_grace_s)
    server.stop(grace=args.shutdown_grace_s).wait()
    servicer.close()
    log.info("stopped")
    return 0
