"""`pocketllm serve`: the gRPC service that trains side networks on devices' activations.

Every device session (keyed by a client-chosen random id) holds a side network and its AdamW
state. A step is acknowledged only once it is trained *and* checkpointed (atomically: temp file,
fsync, rename), so what a client hears acknowledged survives a SIGKILL; a restarted server loads
every session from the state directory and a reconnecting client resumes after the step it last
heard acknowledged. Steps already trained are acknowledged again without training (`duplicate`),
a step beyond the next one is refused: no batch is lost or trained twice.

Every RPC but Health needs the token (constant-time compare); a session's files are named by a
hash of its id, so neither logs nor the state directory reveal ids. A malformed payload aborts
only its own stream with INVALID_ARGUMENT; the server keeps serving everyone else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch

from . import split_pb2 as pb
from . import split_pb2_grpc as pb_grpc
from .quant import quantize
from .side import SideConfig, SideNetwork, head_loss_grad, side_to_bytes
from .wire import TOKEN_HEADER, decode_tensor, read_token, spec_to_config

log = logging.getLogger("pocketllm.serve")
LOCK_WAIT_S = 10.0  # a reconnecting client may find its old stream still holding the session


class Session:
    def __init__(self, sid_hash: str, cfg: SideConfig, path: Path):
        self.sid_hash, self.cfg, self.path = sid_hash, cfg, path
        self.net = SideNetwork(cfg)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate,
                                     weight_decay=cfg.weight_decay)
        self.step = 0
        self.lock = threading.Lock()        # held by the one stream training the session
        self.state_lock = threading.Lock()  # net, optimizer and step change together

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
            raise ValueError(f"model {name!r} is not served here; this server serves "
                             f"{', '.join(sorted(self.allowed))}")
        with self._lock:
            if name not in self._heads:
                from ..loss import output_head
                from ..models import load_model
                model, _ = load_model(name, "float32")
                if getattr(model.config, "final_logit_softcapping", None):
                    raise ValueError(f"model {name!r} soft-caps its logits: not supported")
                head = output_head(model)
                bias = getattr(head, "bias", None)
                self._heads[name] = (head.weight.detach().clone(),
                                     None if bias is None else bias.detach().clone())
                del model
            return self._heads[name]


class SideTuningServicer(pb_grpc.SideTuningServicer):
    def __init__(self, token: str, state_dir: Path, heads: Heads):
        self._token = token.encode()
        self.state_dir = state_dir
        self.heads = heads
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        for path in sorted(state_dir.glob("*.pt")):
            try:
                s = Session.load(path)
            except Exception as e:  # one bad file must not keep the others down
                log.error("session %s: checkpoint %s unreadable (%s); skipped", path.stem[:8],
                          path.name, e)
                continue
            self.sessions[s.sid_hash] = s
            log.info("session %s: restored at step %d", s.tag, s.step)

    # -- helpers ----------------------------------------------------------------------------
    def _auth(self, context) -> None:
        given = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        expected = b"Bearer " + self._token
        if not hmac.compare_digest(given.encode(), expected):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")

    @staticmethod
    def _hash(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()[:32]

    def _session(self, sid: str, context) -> Session:
        if not 16 <= len(sid) <= 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session id must be 16..128 chars")
        s = self.sessions.get(self._hash(sid))
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such session; call Open first")
        return s

    # -- RPCs -------------------------------------------------------------------------------
    def Health(self, request, context):
        return pb.HealthReply(status="SERVING", sessions=len(self.sessions))

    def Open(self, request, context):
        self._auth(context)
        sid = request.session_id
        if not 16 <= len(sid) <= 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session id must be 16..128 chars")
        cfg = spec_to_config(request.spec)
        try:
            cfg.check()
            weight, _ = self.heads.get(cfg.model)
            if weight.shape[1] != cfg.hidden:
                raise ValueError(f"model {cfg.model!r} has hidden size {weight.shape[1]}, "
                                 f"not {cfg.hidden}")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        h = self._hash(sid)
        with self._lock:
            s = self.sessions.get(h)
            if s is not None:
                if s.cfg != cfg:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
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
        self._auth(context)
        s = self._session(request.session_id, context)
        with s.state_lock:
            blob, step = side_to_bytes(s.net), s.step
        log.info("session %s: side network fetched at step %d", s.tag, step)
        return pb.FetchReply(step=step, safetensors=blob)

    def Train(self, request_iterator, context):
        self._auth(context)
        s: Session | None = None
        trained = 0
        try:
            for up in request_iterator:
                if s is None:
                    s = self._session(up.session_id, context)
                    if not s.lock.acquire(timeout=LOCK_WAIT_S):
                        s = None
                        context.abort(grpc.StatusCode.ABORTED, "session busy; retry")
                    log.info("session %s: stream opened at step %d", s.tag, s.step)
                elif self._hash(up.session_id) != s.sid_hash:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one session per stream")
                if up.WhichOneof("kind") != "batch":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a batch")
                try:
                    b = _whole(up, request_iterator, s.cfg)
                except ValueError as e:
                    log.warning("session %s: step %d rejected: %s", s.tag, up.batch.step, e)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {up.batch.step}: {e}")
                if b is None:
                    return  # client gone mid-step: nothing was changed
                if b.step <= s.step:
                    yield pb.Reply(ack=pb.Ack(step=b.step, duplicate=True))
                    continue
                if b.step != s.step + 1:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"step {b.step} sent, the session is at step {s.step}")
                try:
                    taps, final, targets, cands = self._decode(s.cfg, b)
                except ValueError as e:
                    log.warning("session %s: step %d rejected: %s", s.tag, b.step, e)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {b.step}: {e}")
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
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {b.step}: {e}")
                    loss = float(g.grad.loss)
                else:
                    weight, bias = self.heads.get(s.cfg.model)
                    loss, gz = head_loss_grad(final + delta.detach(), targets, weight, bias,
                                              candidates=cands)
                with s.state_lock:
                    s.opt.zero_grad(set_to_none=True)
                    delta.backward(gz)
                    s.opt.step()
                    s.step += 1
                    s.save()
                trained += 1
                yield pb.Reply(ack=pb.Ack(step=s.step, loss=loss))
        finally:
            if s is not None:
                log.info("session %s: stream closed at step %d (%d steps trained)",
                         s.tag, s.step, trained)
                s.lock.release()

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


def make_server(token: str, state_dir: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 0, models: list[str] | None = None, max_message_mb: int = 64,
                workers: int = 16, tls_cert: str = "", tls_key: str = ""):
    """(grpc server, bound port) -- started."""
    from ..models import ALIASES, TINY_CONFIGS
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    heads = Heads(models or [*ALIASES, *TINY_CONFIGS])
    limit = max_message_mb * 2**20
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    pb_grpc.add_SideTuningServicer_to_server(SideTuningServicer(token, state, heads), server)
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
    return server, bound


def serve(args) -> int:
    """Run until SIGTERM/SIGINT (a SIGKILL loses nothing acknowledged)."""
    import signal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    server, port = make_server(read_token(args.token_file), args.state_dir, args.host,
                               args.port, list(args.models) or None, args.max_message_mb,
                               args.workers, args.tls_cert, args.tls_key)
    log.info("serving on %s:%d (state in %s)", args.host, port, args.state_dir)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.stop(grace=5).wait()
    log.info("stopped")
    return 0
