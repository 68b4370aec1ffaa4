"""`pocketllm serve`: the gRPC service that trains side networks on devices' activations.

Every device session (keyed by a client-chosen random id) holds a side network and its AdamW
state. A step is acknowledged only once it is trained *and* checkpointed (atomically: temp file,
fsync, rename), so what a client hears acknowledged survives a SIGKILL; a restarted server loads
every session from the state directory and a reconnecting client resumes after the step it last
heard acknowledged. Steps already trained are acknowledged again without training (`duplicate`;
with private labels, where the device would wait for a side output, refused with ABORTED and the
session's step, so that it reopens), a step beyond the next one is refused: no batch is lost or
trained twice.

Every RPC but Health needs a token (constant-time compare), checked before the request's bytes
are decoded; a session belongs to the token that opened it, and its files are named by a hash of
its id, so neither logs nor the state directory reveal ids. A malformed payload aborts only its
own stream with INVALID_ARGUMENT; the server keeps serving everyone else.

Availability (`--max-streams`, `--stream-idle-s`, `--session-lease-s`, `--keepalive-s`): a Train
stream holds a worker thread for its whole life, so streams get their own slots and the short
calls (Health, Open, Fetch, Delete) their own `--workers`; a stream beyond the slots is refused
with RESOURCE_EXHAUSTED (and a retry-after), a stream silent for `--stream-idle-s` is closed, a
dead or frozen peer's connection is dropped by keepalive pings, and a session whose stream has
been silent for `--session-lease-s` is handed to the next stream that asks for it (its device's
reconnect or `--resume`). Steps stay exact through a takeover: the step counter decides what is
trained, under the session's lock, and only the stream holding the session trains it.

Bounded whatever clients send (`--max-*`, printed at start-up): a side network's parameter
count, the memory one step may take (estimated from its declared shape before its parts are
read), sessions per token and in all, and sessions held in memory (the least recently used idle
one is evicted: its checkpoint already holds it, so it is reloaded on its next use; a session an
RPC uses, a held one included, is pinned and never evicted). Every number a client sends is
checked, and a step whose update would leave anything non-finite is refused and rolled back to
its checkpoint: nothing non-finite is trained, saved or acknowledged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch

from .. import memory
from . import split_pb2 as pb
from ..config import ServeArgs, check, flag
from .quant import payload_bytes, quantize
from .side import (SideConfig, SideNetwork, first_non_finite, head_loss_grad, side_params,
                   side_to_bytes, step_memory)
from .wire import (RETRY_AFTER, TOKEN_HEADER, decode_tensor, read_tokens, session_id_problem,
                   spec_to_config)

log = logging.getLogger("pocketllm.serve")
SERVICE = "pocketllm.split.SideTuning"
PUBLIC_RPCS = {"Health"}  # every other RPC needs a token
MAX_DETAILS = 300  # characters of a refusal's message: never a client's 100 KB value echoed back
CORRUPT = ".corrupt"  # an unreadable checkpoint is renamed <hash>.corrupt, never overwritten
# the resource limits (ServeArgs fields, ranges declared there) `pocketllm serve` prints at start-up
LIMITS = {"max_side_params": "side-network parameters per session",
          "max_step_mb": "MiB of server memory one training step may take",
          "max_sessions": "sessions on the server, all tokens together",
          "max_sessions_per_token": "sessions one token may hold",
          "max_resident_sessions": "sessions held in memory (the least recently used idle one "
                                   "is evicted)"}


class Full(Exception):
    """No room in memory for one more session: every resident one is in use."""


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
    """One device's side network and AdamW state, owned by the token that opened it. In memory
    (`net`, `opt`) only while resident: every acknowledged step is checkpointed, so an idle
    session is evicted by dropping them and reloaded from its checkpoint on its next use."""

    def __init__(self, sid_hash: str, cfg: SideConfig, path: Path, owner: str):
        self.sid_hash, self.cfg, self.path, self.owner = sid_hash, cfg, path, owner
        self.net: SideNetwork | None = None
        self.opt: torch.optim.AdamW | None = None
        self.step = 0
        self.holder: _Stream | None = None  # the one stream training the session (its lease)
        self.pins = 0              # RPCs using it now (the servicer's lock): never evicted then
        self.resident = False      # counted in memory (set with the servicer's lock)
        self.last_used = time.monotonic()
        self.state_lock = threading.Lock()  # net, optimizer, step and holder change together

    @property
    def tag(self) -> str:
        return self.sid_hash[:8]

    def build(self) -> None:
        """A fresh side network and AdamW whose weights and two moments each live in one
        buffer (the tensors are views of it), allocated together now rather than AdamW's
        moments lazily at the first step: a session is three allocations, each mapped on its
        own and returned whole when it is evicted, so sessions loaded and evicted amid steps
        leave no holes in the heap (measured: per resident 1.6M-parameter session, 26 MB of RSS
        with separate lazily created tensors, the 12 B per parameter of these buffers so)."""
        self.net = SideNetwork(self.cfg)
        params = list(self.net.parameters())
        n = sum(p.numel() for p in params)
        weights, m1, m2 = torch.empty(n), torch.zeros(n), torch.zeros(n)
        state, o = {}, 0
        for p in params:
            k = p.numel()
            weights[o:o + k].copy_(p.detach().reshape(-1))
            p.data = weights[o:o + k].view_as(p)
            # AdamW's own initial state (torch.optim.adam), in the buffers
            state[p] = {"step": torch.tensor(0.0), "exp_avg": m1[o:o + k].view_as(p),
                        "exp_avg_sq": m2[o:o + k].view_as(p)}
            o += k
        self.opt = torch.optim.AdamW(params, lr=self.cfg.learning_rate,
                                     weight_decay=self.cfg.weight_decay)
        self.opt.state.update(state)

    def save(self) -> None:
        """Atomic checkpoint: a crash leaves the previous one or this one, never a torn file."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save({"config": self.cfg.to_json(), "step": self.step, "owner": self.owner,
                        "net": self.net.state_dict(), "opt": self.opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def reload(self) -> None:
        """Net, optimizer and step as the checkpoint holds them (after an eviction, or to roll
        back a refused step)."""
        state = torch.load(self.path, weights_only=True)
        self.build()
        self.net.load_state_dict(state["net"])
        # into the buffers build() allocated (the optimizer's load_state_dict would keep the
        # loaded tensors instead); a parameter a checkpoint has no state for (one saved by an
        # earlier version before its first step) keeps AdamW's initial one
        saved = state["opt"]["state"]
        for i, p in enumerate(self.net.parameters()):
            for k, v in saved.get(i, {}).items():
                self.opt.state[p][k].copy_(v)
        self.step = int(state["step"])

    def unload(self) -> None:
        self.net = self.opt = None

    @classmethod
    def load(cls, path: Path, default_owner: str) -> "Session":
        """The session checkpointed at `path`, in memory. Checkpoints written before sessions
        had owners belong to `default_owner` (the token file's first token)."""
        state = torch.load(path, weights_only=True, mmap=True)
        s = cls(path.stem, SideConfig.from_json(state["config"]), path,
                state.get("owner") or default_owner)
        s.reload()
        return s


class Heads:
    """Output-head rows of the public models the server accepts, loaded once each."""

    def __init__(self, allowed: list[str]):
        self.allowed = set(allowed)
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._layers: dict[str, int] = {}
        self._lock = threading.Lock()

    def layers(self, name: str) -> int:
        """The model's decoder layer count (what a session may tap)."""
        self.get(name)
        return self._layers[name]

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
                self._layers[name] = int(model.config.num_hidden_layers)
                del model
            return self._heads[name]


class SideTuningServicer:
    def __init__(self, tokens: list[str], state_dir: Path, heads: Heads,
                 limits: ServeArgs | None = None):
        # owner id (a hash: tokens are never written to the state directory) -> expected header
        self._tokens = {_owner(t): ("Bearer " + t).encode() for t in tokens}
        self.limits = lim = limits or ServeArgs()
        self.state_dir = state_dir
        self.heads = heads
        self.sessions: dict[str, Session] = {}
        self.corrupt: dict[str, str] = {}  # session hash -> its unreadable checkpoint, kept aside
        self._lock = threading.Lock()  # the session table, pins, residency and the streams
        self.max_streams, self.idle_s, self.lease_s = (lim.max_streams, lim.stream_idle_s,
                                                       lim.session_lease_s)
        self._slots = threading.BoundedSemaphore(lim.max_streams)
        self._streams: set[_Stream] = set()
        self._closed = threading.Event()
        for path in sorted(state_dir.glob(f"*{CORRUPT}*")):
            self.corrupt[path.name.split(".")[0]] = path.name
        first = _owner(tokens[0])
        for path in sorted(state_dir.glob("*.pt")):
            try:
                s = Session.load(path, first)
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
            s.resident = True
            self._evict_for(0)  # restored sessions beyond the resident limit wait on disk
            log.info("session %s: restored at step %d", s.tag, s.step)
        threading.Thread(target=self._watch, name="stream-watchdog", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    # -- helpers ----------------------------------------------------------------------------
    def _auth(self, context) -> str:
        """The caller's owner id; UNAUTHENTICATED unless it presents one of the tokens."""
        given = dict(context.invocation_metadata()).get(TOKEN_HEADER, "").encode()
        owner = ""
        for o, expected in self._tokens.items():  # every one compared: no timing on which
            if hmac.compare_digest(given, expected):
                owner = o
        if not owner:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        return owner

    @staticmethod
    def _hash(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()[:32]

    def _unreadable(self, h: str, context) -> None:
        if h in self.corrupt:
            _refuse(context, grpc.StatusCode.DATA_LOSS,
                    f"this session's checkpoint on the server is unreadable (kept aside as "
                    f"{self.corrupt[h]}): it cannot be resumed; start a new run without "
                    "--resume, or have the server's operator restore the file")

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

    @staticmethod
    def _check_sid(sid: str, context) -> None:
        if not 16 <= len(sid) <= 128:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "session id must be 16..128 chars")

    def _evict_for(self, n: int) -> None:
        """Evict least recently used idle sessions until `n` more fit in memory (with the
        servicer's lock held). Only an unpinned session is idle: a Train stream pins its session
        for its whole life, so a held session (`holder`) is never evicted, nor an evicted one
        held. `Full` when every resident one is in use (never with --max-resident-sessions >=
        --max-streams + --workers, which `check_limits` requires: an RPC pins one session)."""
        resident = [s for s in self.sessions.values() if s.resident]
        idle = sorted((s for s in resident if s.pins == 0 and s.holder is None),
                      key=lambda s: s.last_used)
        while len(resident) + n > self.limits.max_resident_sessions:
            if not idle:
                raise Full(f"all {len(resident)} sessions in memory are in use "
                           f"(--max-resident-sessions {self.limits.max_resident_sessions}); "
                           "retry")
            s = idle.pop(0)
            with s.state_lock:
                s.unload()
            s.resident = False
            resident.remove(s)
            memory.trim_heap()  # its small tensors' pages back to the OS
            log.info("session %s: evicted from memory at step %d (least recently used; its "
                     "checkpoint holds it)", s.tag, s.step)

    def _pin(self, sid: str, owner: str, context) -> Session:
        """The caller's session, in memory and pinned (never evicted nor deleted) until
        `_unpin`. NOT_FOUND when it does not exist or another token owns it."""
        self._check_sid(sid, context)
        with self._lock:
            h = self._hash(sid)
            s = self.sessions.get(h)
            if s is None:
                self._unreadable(h, context)
            if s is None or s.owner != owner:
                _refuse(context, grpc.StatusCode.NOT_FOUND, "no such session; call Open first")
            if not s.resident:
                try:
                    self._evict_for(1)
                except Full as e:
                    _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after=1.0)
                s.resident = True
            s.pins += 1
            s.last_used = time.monotonic()
        try:
            with s.state_lock:
                if s.net is None:
                    s.reload()
                    log.info("session %s: loaded into memory at step %d", s.tag, s.step)
        except BaseException:
            self._unpin(s)
            raise
        return s

    def _unpin(self, s: Session) -> None:
        with self._lock:
            s.pins -= 1
            s.last_used = time.monotonic()

    def _admit(self, cfg: SideConfig, rows: int, n_candidates: int) -> None:
        """ValueError unless a step of this shape fits in --max-step-mb."""
        vocab = self.heads.get(cfg.model)[0].shape[0]
        need, limit = step_memory(cfg, rows, n_candidates, vocab), self.limits.max_step_mb
        if need > limit * 2**20:
            cands = f", {n_candidates} candidates" if n_candidates else ""
            raise ValueError(
                f"{rows} rows x {len(cfg.taps)} taps{cands} need about {need / 2**20:.1f} MB of "
                f"server memory, over this server's --max-step-mb {limit}; send fewer rows per "
                "step (--batch-size, --max-seq-length) or tap fewer layers (--tap-every)")

    # -- RPCs (requests arrive decoded and, but for Health, authenticated: `add_to_server`
    # passes the caller's owner id) ----------------------------------------------------------
    def Health(self, request, context, owner=None):
        return pb.HealthReply(status="SERVING")  # nothing else to a caller without a token

    def Open(self, request, context, owner: str):
        sid = request.session_id
        problem = session_id_problem(sid)
        if problem:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        h = self._hash(sid)
        self._unreadable(h, context)
        cfg = spec_to_config(request.spec)
        lim = self.limits
        try:
            cfg.check()
            weight, _ = self.heads.get(cfg.model)
            cfg.check(self.heads.layers(cfg.model))
            if weight.shape[1] != cfg.hidden:
                raise ValueError(f"model {_clip(cfg.model)} has hidden size {weight.shape[1]}, "
                                 f"not {cfg.hidden}")
            n = side_params(cfg)
            if n > lim.max_side_params:
                raise ValueError(
                    f"side network of {n:,} parameters ({len(cfg.taps)} taps, width "
                    f"{cfg.width}, depth {cfg.depth}) is over this server's --max-side-params "
                    f"{lim.max_side_params:,}; choose a smaller --side-width / --side-depth or "
                    "a larger --tap-every")
        except ValueError as e:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._lock:
            s = self.sessions.get(h)
            if s is not None:
                if s.owner != owner:
                    _refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                            "session id in use by another token; use a fresh random id")
                if s.cfg != cfg:
                    _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                            "session exists with another side network spec")
                log.info("session %s: opened at step %d", s.tag, s.step)
                return pb.OpenReply(step=s.step, created=False)
            full = ("Delete finished sessions (SplitClient.delete, `pocketllm train "
                    "--method side --delete-session`) or ask the operator to raise ")
            if len(self.sessions) >= lim.max_sessions:
                _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server full: {len(self.sessions)} sessions (--max-sessions "
                        f"{lim.max_sessions}). " + full + "--max-sessions")
            mine = sum(x.owner == owner for x in self.sessions.values())
            if mine >= lim.max_sessions_per_token:
                _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this token holds {mine} sessions (--max-sessions-per-token "
                        f"{lim.max_sessions_per_token}). " + full +
                        "--max-sessions-per-token")
            try:
                self._evict_for(1)
            except Full as e:
                _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after=1.0)
            s = Session(h, cfg, self.state_dir / f"{h}.pt", owner)
            s.resident, s.pins = True, 1
            s.state_lock.acquire()  # a concurrent Open/Train of it waits for its checkpoint
            self.sessions[h] = s
        try:
            s.build()
            s.save()
        except BaseException as e:
            with self._lock:
                del self.sessions[h]
            if isinstance(e, OSError):  # the state directory is full or unwritable
                log.error("session %s: checkpoint not written: %s", s.tag, e)
                _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server cannot store a new session ({e.strerror})")
            raise
        finally:
            s.state_lock.release()
            with self._lock:
                s.pins -= 1
        log.info("session %s: created (%s, %d taps, width %d, depth %d, %d bits, %s labels, "
                 "%d parameters)", s.tag, cfg.model, len(cfg.taps), cfg.width, cfg.depth,
                 cfg.act_bits, "private" if cfg.private_labels else "sent", side_params(cfg))
        return pb.OpenReply(step=0, created=True)

    def Fetch(self, request, context, owner: str):
        s = self._pin(request.session_id, owner, context)
        try:
            with s.state_lock:
                blob, step = side_to_bytes(s.net), s.step
        finally:
            self._unpin(s)
        log.info("session %s: side network fetched at step %d", s.tag, step)
        return pb.FetchReply(step=step, safetensors=blob)

    def Delete(self, request, context, owner: str):
        self._check_sid(request.session_id, context)
        with self._lock:
            s = self.sessions.get(self._hash(request.session_id))
            if s is None or s.owner != owner:
                _refuse(context, grpc.StatusCode.NOT_FOUND, "no such session")
            if s.pins:
                _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                        "session in use (training or being fetched); stop its device "
                        "and retry")
            del self.sessions[s.sid_hash]
            with s.state_lock:
                s.unload()
                for p in (s.path, s.path.with_suffix(".tmp")):
                    p.unlink(missing_ok=True)
        log.info("session %s: deleted at step %d", s.tag, s.step)
        return pb.DeleteReply(step=s.step)

    def Train(self, request_iterator, context, owner: str):
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

        def refuse(step, e):
            log.warning("session %s: step %d rejected: %s", s.tag, step, e)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"step {step}: {e}")
        try:
            for up in request_iterator:
                if s is None:
                    s = self._pin(up.session_id, owner, context)
                    try:
                        self._claim(s, me, context)
                    except BaseException:
                        self._unpin(s)
                        s = None  # not ours: nothing to release
                        raise
                    log.info("session %s: stream opened at step %d", s.tag, s.step)
                elif self._hash(up.session_id) != s.sid_hash:
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "one session per stream")
                if up.WhichOneof("kind") != "batch":
                    _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected a batch")
                try:
                    b = _whole(up, request_iterator, s.cfg, self._admit)
                except ValueError as e:
                    refuse(up.batch.step, e)
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
                    refuse(b.step, e)
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
                        loss = float(g.grad.loss)  # a float32 on the wire: 1e39 comes as inf
                        if not math.isfinite(loss):
                            raise ValueError(f"the loss sent ({loss}) is not finite")
                    except ValueError as e:
                        refuse(b.step, e)
                else:
                    weight, bias = self.heads.get(s.cfg.model)
                    loss, gz = head_loss_grad(final + delta.detach(), targets, weight, bias,
                                              candidates=cands)
                    if not (math.isfinite(loss) and bool(torch.isfinite(gz).all())):
                        refuse(b.step, f"the loss on it is not finite ({loss}): the final "
                               "hidden state sent is out of range")
                with s.state_lock:
                    if s.holder is not me:  # taken over while this step was on its way
                        _refuse(context, grpc.StatusCode.ABORTED,
                                "session taken over by another stream; reopen it")
                    bad = self._update(s, delta, gz)
                    if bad is None:
                        s.step += 1
                        s.save()
                if bad:
                    refuse(b.step, f"not trained: {bad}; the session stays at step {s.step}")
                trained += 1
                me.touch()  # the training was ours, not the device's silence
                yield pb.Reply(ack=pb.Ack(step=s.step, loss=loss))
        finally:
            if s is not None:
                log.info("session %s: stream closed at step %d (%d steps trained)",
                         s.tag, s.step, trained)
                self._release(s, me)  # no holder once unpinned: evictable again
                self._unpin(s)
            with self._lock:
                self._streams.discard(me)
            self._slots.release()

    @staticmethod
    def _update(s: Session, delta: torch.Tensor, gz: torch.Tensor) -> str | None:
        """One AdamW step from the gradient `gz` of the side output `delta`: None once taken,
        else why it was not. A non-finite parameter gradient changes nothing; a step that leaves
        a parameter or AdamW moment non-finite is rolled back to the checkpoint (which holds
        the state before it: every step is saved before it is acknowledged)."""
        s.opt.zero_grad(set_to_none=True)
        delta.backward(gz)
        bad = first_non_finite((n, p.grad) for n, p in s.net.named_parameters())
        if bad:
            s.opt.zero_grad(set_to_none=True)
            return f"the gradient of {bad} is not finite (the gradient is too large)"
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)  # gradients are not kept between steps
        bad = first_non_finite(s.net.named_parameters()) or first_non_finite(
            (f"AdamW {k} of {n}", v) for n, p in s.net.named_parameters()
            for k, v in s.opt.state[p].items())
        if bad:
            s.reload()
            return f"it leaves {bad} not finite (the gradient is too large)"
        return None

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


def _whole(up: pb.Upload, rest: Iterator[pb.Upload], cfg: SideConfig,
           admit: Callable[[SideConfig, int, int], None]) -> pb.Batch | None:
    """The step whose batch `up` begins, reading its other parts (`Batch.parts` > 1) from
    `rest`; None if the stream ends before the last part, ValueError on a part out of place.
    `admit(cfg, rows, n_candidates)` refuses a step too large for the server as soon as its
    first tap declares its rows: before its other parts are read and held."""
    first = up.batch
    n = first.parts
    rows = first.taps[0].rows if first.taps else 0
    admit(cfg, rows, first.n_candidates)
    if n <= 1 and first.part == 0:
        return first
    if first.part != 0 or n > len(cfg.taps):
        raise ValueError(f"part {first.part} of {n} begins the step (the session takes "
                         f"{len(cfg.taps)} taps, at most one part each)")
    size = payload_bytes(rows, cfg.hidden, cfg.act_bits)
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
        # what is held grows part by part: each tap the size the first one declared
        for t in b.taps:
            if t.rows != rows or len(t.data) + len(t.scales) != size:
                raise ValueError(f"part {i}: a tap of {t.rows} rows and "
                                 f"{len(t.data) + len(t.scales)} bytes, expected {rows} rows "
                                 f"in {size} bytes")
        if len(whole.taps) + len(b.taps) > len(cfg.taps):
            raise ValueError(f"more than the session's {len(cfg.taps)} taps sent")
        whole.MergeFrom(b)  # repeated taps append in order; final / targets come with the last
    admit(cfg, rows, whole.n_candidates)
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
    RPC checks the token (all but PUBLIC_RPCS) before decoding anything and hands the method its
    owner id (`method(request, context, owner)`), and bytes that are not
    its message get INVALID_ARGUMENT (`_parse`), not gRPC's INTERNAL and a logged traceback."""
    rpcs = {}
    for m in pb.DESCRIPTOR.services_by_name["SideTuning"].methods:
        reply = getattr(pb, m.output_type.name).SerializeToString
        request = getattr(pb, m.input_type.name)
        method, public = getattr(servicer, m.name), m.name in PUBLIC_RPCS
        if m.client_streaming and m.server_streaming:
            def stream(raw_iter, context, method=method, request=request, public=public):
                owner = None if public else servicer._auth(context)
                yield from method((_parse(request, raw, context) for raw in raw_iter), context,
                                  owner)
            rpcs[m.name] = grpc.stream_stream_rpc_method_handler(stream, None, reply)
        elif not (m.client_streaming or m.server_streaming):
            def unary(raw, context, method=method, request=request, public=public):
                owner = None if public else servicer._auth(context)
                return method(_parse(request, raw, context), context, owner)
            rpcs[m.name] = grpc.unary_unary_rpc_method_handler(unary, None, reply)
        else:
            raise NotImplementedError(f"{m.name}: only unary and bidirectional RPCs are served")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, rpcs),))
    server.add_registered_method_handlers(SERVICE, rpcs)


def _owner(token: str) -> str:
    """A token's owner id: what the state directory records instead of the token."""
    return hashlib.sha256(b"pocketllm-owner:" + token.encode()).hexdigest()[:16]


def limit_lines(args: ServeArgs) -> list[str]:
    """The limits `pocketllm serve` prints at start-up, one line each: what one client may take
    of this server (availability first, then LIMITS)."""
    return [f"{args.max_streams} Train streams at once (--max-streams), "
            f"{args.workers} more workers for Health/Open/Fetch/Delete (--workers)",
            f"a stream silent for {args.stream_idle_s:g} s is closed (--stream-idle-s)",
            f"a session silent for {args.session_lease_s:g} s can be taken over by its device's "
            "reconnect (--session-lease-s)",
            f"keepalive: a connection idle {args.keepalive_s:g} s is pinged, dropped without "
            f"an answer in {args.keepalive_s:g} s (--keepalive-s)",
            f"SIGTERM: streams get {args.shutdown_grace_s:g} s to finish (--shutdown-grace-s)",
            *(f"{flag(name)} {getattr(args, name)}: {what}" for name, what in LIMITS.items())]


def check_limits(args: ServeArgs) -> None:
    """SystemExit naming the flag unless every limit is usable: each within the range ServeArgs
    declares, and room in memory for every session in use at once."""
    check(args)  # SettingError (a SystemExit) naming the flag
    busy = args.max_streams + args.workers
    if args.max_resident_sessions < busy:
        raise SystemExit(f"--max-resident-sessions {args.max_resident_sessions} is below "
                         f"--max-streams {args.max_streams} + --workers {args.workers}: each "
                         "stream and each worker may hold a session in use, so at least that "
                         "many must fit in memory")


def make_server(token: str | list[str], state_dir: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 0, models: list[str] | None = None, max_message_mb: int = 64,
                tls_cert: str = "", tls_key: str = "", limits: ServeArgs | None = None):
    """(grpc server, bound port, servicer) -- started. `token`: the token, or the tokens (the
    first owns checkpoints written before sessions had owners); `limits`: ServeArgs' stream,
    worker, timeout and `--max-*` settings (its defaults if None)."""
    from ..models import ALIASES, TINY_CONFIGS
    limits = limits or ServeArgs()
    check_limits(limits)
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    heads = Heads(models or [*ALIASES, *TINY_CONFIGS])
    limit = max_message_mb * 2**20
    ping_ms = int(limits.keepalive_s * 1000)
    # a Train stream holds its thread for its whole life: one per stream slot, and `workers`
    # more, so that no number of streams can keep Health, Open or Fetch waiting
    pool = futures.ThreadPoolExecutor(max_workers=limits.max_streams + limits.workers)
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
    tokens = [token] if isinstance(token, str) else list(token)
    servicer = SideTuningServicer(tokens, state, heads, limits)
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
    # one malloc arena: with one per worker thread each would keep the memory its steps freed,
    # and the server's peak would creep towards --workers x --max-step-mb (measured: two
    # 3.7 MB steps with 1024 candidates each raised it by 64 MB, by 29 MB with one arena);
    # and large tensors mapped on their own, so evicted sessions leave no holes in the heap
    memory.server_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    server, port, servicer = make_server(
        read_tokens(args.token_file), args.state_dir, args.host, args.port,
        list(args.models) or None, args.max_message_mb, args.tls_cert, args.tls_key, args)
    log.info("serving on %s:%d (state in %s)", args.host, port, args.state_dir)
    for line in limit_lines(args):
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
